//! `forward` / `forward_backward` over a fused batch of several adapters' requests.
//!
//! All datums of all requests become rows of right-padded batches (one, unless the memory budget
//! splits them into micro-batches); each row uses its request's adapter. The base model runs once
//! per micro-batch, each request's loss is computed on its own rows, and the backward pass of the
//! sum of all requests' losses leaves in every adapter exactly the gradient of its own loss (the
//! other terms do not depend on its tensors). Gradients accumulate across calls until the
//! optimizer step zeroes them.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::decoder::backward_with;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::lora::{AdapterStack, LoraAdapter, LoraBatch, StackSet};
use crate::loss::{elementwise_loss, sequence_log_ratio, target_logprobs, LossFn, LossInputs};
use crate::memory::{self, Mode, PassCost};

/// One training example: the model input and the loss's per-token inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    /// Tokens fed to the model; position `i` predicts `loss_inputs.target_tokens[i]`.
    pub input_tokens: Vec<i64>,
    /// Targets, weights, sampler log-probabilities, advantages.
    pub loss_inputs: LossInputs,
}

/// One adapter's (or the base model's) share of a fused batch.
#[derive(Clone, Copy)]
pub struct TrainRequest<'a> {
    /// The adapter whose rows these are; `None` runs the base model.
    pub adapter: Option<&'a LoraAdapter>,
    /// The loss of every datum of the request.
    pub loss: LossFn,
    /// The datums.
    pub data: &'a [Datum],
}

/// Per-datum outputs, as the SDK names them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatumOutput {
    /// Model log-probability of each target token.
    pub logprobs: Vec<f32>,
    /// Per-token loss (already weighted).
    pub elementwise_loss: Vec<f32>,
}

/// Result of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestOutput {
    /// One entry per datum, in order.
    pub outputs: Vec<DatumOutput>,
    /// Sum of every datum's loss (`loss:sum`).
    pub loss_sum: f64,
}

/// Checks a request's datums against the model, naming the datum and field. Needs only the
/// configuration, so requests can be refused before they are queued.
pub fn validate_request(config: &ModelConfig, loss: &LossFn, data: &[Datum]) -> Result<()> {
    if data.is_empty() {
        return Err(ModelError::invalid("data", "must hold at least one datum"));
    }
    let context = config.max_position_embeddings;
    for (i, d) in data.iter().enumerate() {
        let at = |e: ModelError| match e {
            ModelError::InvalidInput { field, reason } => {
                ModelError::invalid(format!("data[{i}].{field}"), reason)
            }
            other => other,
        };
        let n = d.input_tokens.len();
        if n == 0 {
            return Err(ModelError::invalid(
                format!("data[{i}].model_input"),
                "is empty",
            ));
        }
        if n as i64 > context {
            return Err(ModelError::invalid(
                format!("data[{i}].model_input"),
                format!("has {n} tokens, more than the model's context of {context}"),
            ));
        }
        config
            .check_tokens("model_input", &d.input_tokens)
            .map_err(at)?;
        d.loss_inputs
            .validate(loss, n, config.vocab_size)
            .map_err(at)?;
    }
    Ok(())
}

/// Runs every request in one batch. With `backward`, gradients of each request's loss
/// accumulate into its adapter; without, no graph is built and no gradient changes.
///
/// The batch runs in micro-batches whose activations fit `budget` bytes, and the loss is
/// computed in chunks of tokens so that no `[tokens, vocab]` tensor is held whole (see
/// [`crate::memory`]); gradients are summed over the micro-batches and added to the adapters
/// only once every one succeeded, so a failure leaves no partial gradient.
pub fn forward_backward(
    decoder: &Decoder,
    requests: &[TrainRequest],
    backward: bool,
    budget: u64,
) -> Result<Vec<RequestOutput>> {
    for r in requests {
        validate_request(decoder.config(), &r.loss, r.data)?;
    }
    if backward {
        run(decoder, requests, true, budget)
    } else {
        tch::no_grad(|| run(decoder, requests, false, budget))
    }
}

/// One row of a batch: its datum and its request's loss.
struct Row<'a> {
    datum: &'a Datum,
    loss: LossFn,
}

fn run(
    decoder: &Decoder,
    requests: &[TrainRequest],
    backward: bool,
    budget: u64,
) -> Result<Vec<RequestOutput>> {
    let rows: Vec<Row> = requests
        .iter()
        .flat_map(|r| {
            r.data.iter().map(|datum| Row {
                datum,
                loss: r.loss,
            })
        })
        .collect();
    let adapters: Vec<Option<&LoraAdapter>> = requests.iter().map(|r| r.adapter).collect();
    let stacks = StackSet::new(&adapters, decoder.kind(), backward)?;
    let mut assignment = Vec::with_capacity(rows.len());
    for r in requests {
        let slot = r.adapter.map(|a| stacks.member(a)).transpose()?;
        assignment.extend(std::iter::repeat_n(slot, r.data.len()));
    }
    let lengths: Vec<usize> = rows.iter().map(|r| r.datum.input_tokens.len()).collect();
    let cost = PassCost::new(decoder.config(), decoder.kind());
    let plan = memory::plan(&lengths, backward, &cost, budget)?;
    let mut outputs = Vec::with_capacity(rows.len());
    for micro in &plan.micro_batches {
        let part = &rows[micro.rows.clone()];
        let slots = &assignment[micro.rows.clone()];
        let mut ids = vec![0i64; part.len() * micro.len];
        for (r, row) in part.iter().enumerate() {
            let tokens = &row.datum.input_tokens;
            ids[r * micro.len..r * micro.len + tokens.len()].copy_from_slice(tokens);
        }
        let ids = Tensor::from_slice(&ids).f_view([part.len() as i64, micro.len as i64])?;
        let lora = LoraBatch::new(slots)?;
        let checkpointed = match micro.mode {
            Mode::Checkpointed => Some(decoder.hidden_states_checkpointed(&ids, Some(&lora))?),
            Mode::Full | Mode::NoGrad => None,
        };
        let hidden = match &checkpointed {
            Some(pass) => pass.hidden.shallow_clone(),
            None => decoder.hidden_states(&ids, Some(&lora))?,
        };
        let losses = Losses::new(&hidden, backward)?;
        losses.run(decoder, part, slots, plan.loss_chunk, &mut outputs)?;
        let Some(grad) = losses.hidden_grad()? else {
            continue;
        };
        match checkpointed {
            Some(pass) => {
                drop(hidden);
                decoder.backward_checkpointed(pass, Some(&lora), &grad)?;
            }
            None if hidden.requires_grad() => backward_with(&hidden, &grad)?,
            None => {}
        }
    }
    if backward {
        stacks.accumulate_leaf_grads()?;
    }
    let mut outputs = outputs.into_iter();
    Ok(requests
        .iter()
        .map(|r| {
            let outputs: Vec<(DatumOutput, f64)> = outputs.by_ref().take(r.data.len()).collect();
            RequestOutput {
                loss_sum: outputs.iter().map(|(_, sum)| sum).sum(),
                outputs: outputs.into_iter().map(|(o, _)| o).collect(),
            }
        })
        .collect())
}

/// A piece of a micro-batch's loss: rows `rows` (consecutive, of one loss function), positions
/// `start..start + len` of each, shorter rows padded to `len`.
struct LossChunk {
    rows: Range<usize>,
    start: usize,
    len: usize,
}

impl LossChunk {
    /// How many of row `row`'s positions (a row of the chunk) the chunk covers.
    fn covered(&self, row: &Row) -> usize {
        row.datum
            .input_tokens
            .len()
            .saturating_sub(self.start)
            .min(self.len)
    }
}

/// Splits a micro-batch's rows into loss chunks of at most `chunk` padded tokens: consecutive
/// rows of one loss function together (their logits are one matmul), a row longer than `chunk`
/// alone, in pieces.
fn loss_chunks(rows: &[Row], chunk: usize) -> Vec<LossChunk> {
    let chunk = chunk.max(1);
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < rows.len() {
        let n = rows[first].datum.input_tokens.len();
        if n > chunk {
            chunks.extend((0..n).step_by(chunk).map(|start| LossChunk {
                rows: first..first + 1,
                start,
                len: chunk.min(n - start),
            }));
            first += 1;
            continue;
        }
        let (mut end, mut longest) = (first + 1, n);
        while let Some(next) = rows.get(end) {
            let padded = longest.max(next.datum.input_tokens.len());
            if next.loss != rows[first].loss || padded * (end + 1 - first) > chunk {
                break;
            }
            (end, longest) = (end + 1, padded);
        }
        chunks.push(LossChunk {
            rows: first..end,
            start: 0,
            len: longest,
        });
        first = end;
    }
    chunks
}

/// The loss inputs of `chunk`'s rows `rows`, row after row, each padded to the chunk's length.
/// Padding gets weight 0 (and 0 for every other input), so its loss and gradient are 0.
fn padded_inputs(rows: &[Row], chunk: &LossChunk) -> LossInputs {
    let (start, len) = (chunk.start, chunk.len);
    let padded = rows.iter().any(|row| chunk.covered(row) < len);
    let field = |get: fn(&LossInputs) -> &Option<Vec<f32>>, default: Option<f32>| {
        let absent = rows.iter().all(|row| get(&row.datum.loss_inputs).is_none());
        if absent && (default.is_none() || !padded) {
            return None;
        }
        let mut out = vec![0f32; rows.len() * len];
        for (i, row) in rows.iter().enumerate() {
            let n = chunk.covered(row);
            let dst = &mut out[i * len..i * len + n];
            match get(&row.datum.loss_inputs) {
                Some(values) => dst.copy_from_slice(&values[start..start + n]),
                None => dst.fill(default.unwrap_or(0.0)),
            }
        }
        Some(out)
    };
    LossInputs {
        target_tokens: Vec::new(),
        weights: field(|i| &i.weights, Some(1.0)),
        logprobs: field(|i| &i.logprobs, None),
        advantages: field(|i| &i.advantages, None),
        sequence_ratio_mask: None,
        recorded: field(|i| &i.recorded, None),
    }
}

/// The loss side of one micro-batch: logits, log-probabilities and losses, a chunk of tokens at
/// a time. With a backward pass the chunks read a detached copy of the hidden states, so each
/// chunk's gradient can be taken (and its logits freed) before the next; the summed gradient
/// with respect to the hidden states then goes back through the blocks once.
///
/// A chunk holds as many rows as fit its token budget: its logits, log-probabilities and losses
/// are a fixed number of operations and one device-to-host copy, whatever its number of rows.
struct Losses {
    /// The hidden states the chunks read: an autograd leaf when there is a backward pass.
    hidden: Tensor,
    backward: bool,
}

impl Losses {
    fn new(hidden: &Tensor, backward: bool) -> Result<Self> {
        let hidden = if backward {
            hidden.f_detach()?.set_requires_grad(true)
        } else {
            hidden.shallow_clone()
        };
        Ok(Losses { hidden, backward })
    }

    /// The log-probabilities `[rows, len]` of `chunk`'s targets (0 at padding); `rows` and
    /// `slots` are the chunk's. Its logits are computed and freed here.
    fn chunk_logprobs(
        &self,
        decoder: &Decoder,
        chunk: &LossChunk,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
    ) -> Result<Tensor> {
        let (n, len) = (rows.len() as i64, chunk.len as i64);
        let hidden = self
            .hidden
            .f_narrow(0, chunk.rows.start as i64, n)?
            .f_narrow(1, chunk.start as i64, len)?;
        let lora = if slots.iter().any(Option::is_some) {
            Some(LoraBatch::new(slots)?)
        } else {
            None
        };
        let logits = decoder.logits(&hidden, lora.as_ref())?;
        let mut targets = vec![0i64; rows.len() * chunk.len];
        for (i, row) in rows.iter().enumerate() {
            let covered = chunk.covered(row);
            let from = &row.datum.loss_inputs.target_tokens[chunk.start..chunk.start + covered];
            targets[i * chunk.len..i * chunk.len + covered].copy_from_slice(from);
        }
        let vocab = logits.size()[2];
        Ok(target_logprobs(&logits.f_view([-1, vocab])?, &targets)?.f_view([n, len])?)
    }

    /// GSPO's sequence log ratio of each row (0 for other losses): the rows' log-probabilities
    /// first, without a graph, since every token's loss depends on its whole sequence.
    fn sequence_log_ratios(
        &self,
        decoder: &Decoder,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
        chunks: &[LossChunk],
    ) -> Result<Vec<f64>> {
        let mut ratios = vec![0.0; rows.len()];
        let needed = |c: &&LossChunk| rows[c.rows.start].loss.needs_sequence_ratio();
        if !chunks.iter().any(|c| needed(&c)) {
            return Ok(ratios);
        }
        let mut lps: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
        tch::no_grad(|| -> Result<()> {
            for c in chunks.iter().filter(needed) {
                let part = &rows[c.rows.clone()];
                let lp = self.chunk_logprobs(decoder, c, part, &slots[c.rows.clone()])?;
                let lp = to_vec(&lp.f_view([-1])?)?;
                for (i, row) in part.iter().enumerate() {
                    let at = i * c.len;
                    lps[c.rows.start + i].extend_from_slice(&lp[at..at + c.covered(row)]);
                }
            }
            Ok(())
        })?;
        for ((ratio, row), lp) in ratios.iter_mut().zip(rows).zip(&lps) {
            if row.loss.needs_sequence_ratio() {
                *ratio = sequence_log_ratio(lp, &row.datum.loss_inputs);
            }
        }
        Ok(ratios)
    }

    /// Computes every row's outputs and loss sum (appended to `outputs` in row order). Chunks'
    /// losses are summed until they hold `chunk` tokens of logits, then their gradient is taken
    /// and their logits freed: one backward call for a batch that fits one chunk.
    fn run(
        &self,
        decoder: &Decoder,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
        chunk: usize,
        outputs: &mut Vec<(DatumOutput, f64)>,
    ) -> Result<()> {
        let chunks = loss_chunks(rows, chunk);
        let ratios = self.sequence_log_ratios(decoder, rows, slots, &chunks)?;
        let first = outputs.len();
        outputs.extend(rows.iter().map(|row| {
            let n = row.datum.input_tokens.len();
            let output = DatumOutput {
                logprobs: Vec::with_capacity(n),
                elementwise_loss: Vec::with_capacity(n),
            };
            (output, 0.0)
        }));
        let mut pending: Option<(Tensor, usize)> = None;
        for c in &chunks {
            let part = &rows[c.rows.clone()];
            let lp = self.chunk_logprobs(decoder, c, part, &slots[c.rows.clone()])?;
            let inputs = padded_inputs(part, c);
            let el = elementwise_loss(&part[0].loss, &lp, &inputs, &ratios[c.rows.clone()])?;
            let sums = el.f_sum_dim_intlist(1, false, Kind::Float)?;
            // One copy to the host for the whole chunk: log-probabilities, losses, row sums.
            let host = to_vec(&Tensor::f_cat(
                &[lp.f_view([-1])?, el.f_view([-1])?, sums],
                0,
            )?)?;
            let cells = part.len() * c.len;
            for (i, row) in part.iter().enumerate() {
                let (at, covered) = (i * c.len, c.covered(row));
                let (output, sum) = &mut outputs[first + c.rows.start + i];
                output.logprobs.extend_from_slice(&host[at..at + covered]);
                let losses = &host[cells + at..cells + at + covered];
                output.elementwise_loss.extend_from_slice(losses);
                *sum += f64::from(host[2 * cells + i]);
            }
            if self.backward && el.requires_grad() {
                let total = el.f_sum(Kind::Float)?;
                pending = match pending.take() {
                    Some((sum, tokens)) if tokens + cells <= chunk => {
                        Some((sum.f_add(&total)?, tokens + cells))
                    }
                    Some((sum, _)) => {
                        sum.f_backward()?;
                        Some((total, cells))
                    }
                    None => Some((total, cells)),
                };
            }
        }
        if let Some((total, _)) = pending {
            total.f_backward()?;
        }
        Ok(())
    }

    /// The loss's gradient with respect to the hidden states, once every chunk ran (`None`
    /// without a backward pass).
    fn hidden_grad(&self) -> Result<Option<Tensor>> {
        if !self.backward {
            return Ok(None);
        }
        let grad = self.hidden.f_grad()?;
        Ok(grad.defined().then_some(grad))
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&t)?)
}
