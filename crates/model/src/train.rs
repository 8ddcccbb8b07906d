//! `forward` / `forward_backward` over a fused batch of several adapters' requests.
//!
//! All datums of all requests become rows of right-padded batches (one, unless the memory budget
//! splits them into micro-batches); each row uses its request's adapter. The base model runs once
//! per micro-batch, each request's loss is computed on its own rows, and the backward pass of the
//! sum of all requests' losses leaves in every adapter exactly the gradient of its own loss (the
//! other terms do not depend on its tensors). Gradients accumulate across calls until the
//! optimizer step zeroes them.

use std::ops::Range;
use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::custom_loss::{reduce_metrics, CustomLoss, DatumLoss, NamedInput};
use crate::decoder::backward_with;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::lora::{held_bytes, AdapterStack, LoraAdapter, LoraBatch, StackSet};
use crate::loss::{elementwise_loss, sequence_log_ratio, target_logprobs, LossFn, LossInputs};
use crate::memory::{self, Mode, PassCost};

/// One training example: the model input and the loss's per-token inputs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Datum {
    /// Tokens fed to the model; position `i` predicts `loss_inputs.target_tokens[i]`.
    pub input_tokens: Vec<i64>,
    /// Targets, weights, sampler log-probabilities, advantages.
    pub loss_inputs: LossInputs,
    /// The custom loss of the datum's request (`create_custom_loss`) and the datum's inputs to
    /// it; `None` for the built-in losses. A custom datum's `loss_inputs` hold its targets
    /// only, and its request's [`TrainRequest::loss`] is ignored. Not serialized: whoever
    /// stores a datum stores its loss by id ([`CustomInputs::loss_id`]) and its inputs.
    #[serde(skip)]
    pub custom: Option<CustomInputs>,
}

impl Datum {
    /// The shape of the datum's targets, and so of its logprobs: `[N]`, or `[N, K]` for K
    /// targets per position.
    fn target_shape(&self) -> Vec<i64> {
        let n = self.input_tokens.len() as i64;
        match self.loss_inputs.targets_per_position {
            Some(k) => vec![n, k as i64],
            None => vec![n],
        }
    }
}

/// A custom loss and one datum's values of its inputs after `logprobs`.
#[derive(Debug, Clone)]
pub struct CustomInputs {
    /// The loss.
    pub loss: Arc<CustomLoss>,
    /// The loss's id (`create_custom_loss`'s answer), by which it is found again.
    pub loss_id: String,
    /// The values of [`CustomLoss::input_params`], in order.
    pub inputs: Vec<NamedInput>,
}

impl PartialEq for CustomInputs {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.loss, &other.loss) && self.inputs == other.inputs
    }
}

impl CustomInputs {
    /// Checks the inputs against the loss's parameters: one value per parameter, of its rank,
    /// and the targets (`targets_per_position`) against the rank of `logprobs`.
    fn validate(&self, targets_per_position: Option<usize>) -> Result<()> {
        let want = self.loss.params()[0].rank;
        let have = if targets_per_position.is_some() { 2 } else { 1 };
        if want != have {
            return Err(ModelError::invalid(
                "loss_fn_inputs.target_tokens",
                format!(
                    "has rank {have}, but loss `{}` declared logprobs with rank {want}",
                    self.loss.name()
                ),
            ));
        }
        let params = self.loss.input_params();
        if params.len() != self.inputs.len() {
            return Err(ModelError::invalid(
                "loss_fn_inputs",
                format!(
                    "loss `{}` reads {} inputs, got {}",
                    self.loss.name(),
                    params.len(),
                    self.inputs.len()
                ),
            ));
        }
        for (param, input) in params.iter().zip(&self.inputs) {
            if input.shape.len() != usize::from(param.rank) {
                return Err(ModelError::invalid(
                    format!("loss_fn_inputs.{}", param.name),
                    format!(
                        "has rank {}, but loss `{}` declared it with rank {}",
                        input.shape.len(),
                        self.loss.name(),
                        param.rank
                    ),
                ));
            }
        }
        Ok(())
    }
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
    /// Model log-probability of each target token (`[N, K]` row after row for K targets per
    /// position).
    pub logprobs: Vec<f32>,
    /// Per-target loss (already weighted), shaped as `logprobs`.
    pub elementwise_loss: Vec<f32>,
    /// K when the datum had K targets per position (2-D `target_tokens`), else `None`.
    #[serde(default)]
    pub targets_per_position: Option<usize>,
}

/// Result of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RequestOutput {
    /// One entry per datum, in order.
    pub outputs: Vec<DatumOutput>,
    /// Sum of every datum's loss (`loss:sum`).
    pub loss_sum: f64,
    /// A custom loss's metrics over the request's datums (`custom/<name>:sum` summed,
    /// `:mean` averaged); empty for the built-in losses.
    #[serde(default)]
    pub metrics: Vec<(String, f64)>,
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
        match &d.custom {
            None => d.loss_inputs.validate(loss, n, config.vocab_size),
            Some(custom) => d
                .loss_inputs
                .validate(&LossFn::CrossEntropy, n, config.vocab_size)
                .and_then(|()| custom.validate(d.loss_inputs.targets_per_position)),
        }
        .map_err(at)?;
    }
    Ok(())
}

/// Runs each custom datum's loss once on its shapes (see [`CustomLoss::check_runs`]), so a
/// loss that cannot run on a datum's inputs fails its own request, naming the datum, before
/// the request is fused with others. Runs libtorch ops: call it on a worker thread.
pub fn check_custom_losses(data: &[Datum]) -> Result<()> {
    for (i, d) in data.iter().enumerate() {
        let Some(custom) = &d.custom else {
            continue;
        };
        custom
            .loss
            .check_runs(&d.target_shape(), &custom.inputs)
            .map_err(|e| match e {
                ModelError::InvalidInput { field, reason } => {
                    ModelError::invalid(format!("data[{i}].{field}"), reason)
                }
                other => other,
            })?;
    }
    Ok(())
}

/// Runs every request in one batch. With `backward`, gradients of each request's loss
/// accumulate into its adapter; without, no graph is built and no gradient changes.
///
/// The batch runs in micro-batches whose activations fit `budget` bytes, less what the batch's
/// adapter stacks hold throughout (their copies of the adapters' weights), and the loss is
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

/// One row of a batch: its datum and its request's loss (`cross_entropy` for a custom loss's
/// row, whose linearisation it runs, see [`Losses::custom_losses`]).
#[derive(Clone, Copy)]
struct Row<'a> {
    datum: &'a Datum,
    loss: LossFn,
}

impl Row<'_> {
    fn custom(&self) -> Option<&CustomInputs> {
        self.datum.custom.as_ref()
    }
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
                loss: match datum.custom {
                    Some(_) => LossFn::CrossEntropy,
                    None => r.loss,
                },
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
    // The stacks' copies of their members' weights are held through every micro-batch.
    let budget = budget.saturating_sub(held_bytes(&adapters, decoder.kind()));
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
            let rows: Vec<RowOutput> = outputs.by_ref().take(r.data.len()).collect();
            let metrics: Vec<Vec<(String, f64)>> =
                rows.iter().filter_map(|row| row.metrics.clone()).collect();
            RequestOutput {
                loss_sum: rows.iter().map(|row| row.loss).sum(),
                metrics: reduce_metrics(&metrics),
                outputs: rows.into_iter().map(|row| row.output).collect(),
            }
        })
        .collect())
}

/// A piece of a micro-batch's loss: consecutive rows of one loss function over the same
/// positions, the shorter rows padded.
struct LossChunk {
    /// The rows (indices into the micro-batch).
    rows: Range<usize>,
    /// The first position.
    start: usize,
    /// Positions per row: the longest row's share, to which the others are padded.
    len: usize,
    /// Targets per position of every row of the chunk ([`LossInputs::width`]).
    width: usize,
}

impl LossChunk {
    /// How many of `row`'s positions (a row of the chunk) the chunk covers.
    fn covered(&self, row: &Row) -> usize {
        row.datum
            .input_tokens
            .len()
            .saturating_sub(self.start)
            .min(self.len)
    }

    /// Per-position values (`per` a position) of the chunk's `rows` at its positions, row
    /// after row, each padded to the chunk's length with `pad`; a row for which `values` has
    /// none gets `default`.
    fn padded<T: Copy + 'static>(
        &self,
        rows: &[Row],
        pad: T,
        default: T,
        per: usize,
        values: impl for<'d> Fn(&'d Datum) -> Option<&'d [T]>,
    ) -> Vec<T> {
        let stride = self.len * per;
        let mut out = vec![pad; rows.len() * stride];
        for (i, row) in rows.iter().enumerate() {
            let n = self.covered(row) * per;
            let dst = &mut out[i * stride..i * stride + n];
            match values(row.datum) {
                Some(v) => dst.copy_from_slice(&v[self.start * per..self.start * per + n]),
                None => dst.fill(default),
            }
        }
        out
    }

    /// Row `i` (`row`) of a `[rows, len, width]` result of the chunk, without its padding.
    fn unpadded<'a, T>(&self, values: &'a [T], i: usize, row: &Row) -> &'a [T] {
        let stride = self.len * self.width;
        &values[i * stride..i * stride + self.covered(row) * self.width]
    }
}

/// Splits a micro-batch's rows (`slots`: their adapters) into loss chunks of at most `chunk`
/// padded tokens: consecutive rows of one loss function and number of targets per position
/// together (their logits are one matmul), a row longer than `chunk` alone, in pieces.
///
/// Rows of different adapters in one chunk each get their own copy of their unembedding LoRA
/// `B` (`[vocab, rank]`, and its gradient): charged as `rank` more tokens per row.
fn loss_chunks(
    rows: &[Row],
    slots: &[Option<(&AdapterStack, i64)>],
    chunk: usize,
) -> Vec<LossChunk> {
    let chunk = chunk.max(1);
    let gathered = |r: usize| slots[r].and_then(|(s, _)| s.unembed_rank()).unwrap_or(0) as usize;
    let same_slot = |a: usize, b: usize| match (slots[a], slots[b]) {
        (None, None) => true,
        (Some((s, m)), Some((t, n))) => std::ptr::eq(s, t) && m == n,
        _ => false,
    };
    let width = |r: usize| rows[r].datum.loss_inputs.width();
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < rows.len() {
        let n = rows[first].datum.input_tokens.len();
        if n > chunk {
            chunks.extend((0..n).step_by(chunk).map(|start| LossChunk {
                rows: first..first + 1,
                start,
                len: chunk.min(n - start),
                width: width(first),
            }));
            first += 1;
            continue;
        }
        let (mut end, mut longest, mut mixed, mut copies) = (first + 1, n, false, gathered(first));
        while let Some(next) = rows.get(end) {
            let padded = longest.max(next.datum.input_tokens.len());
            let now_mixed = mixed || !same_slot(first, end);
            let now_copies = copies + gathered(end);
            let cost = padded * (end + 1 - first) + if now_mixed { now_copies } else { 0 };
            let custom = |r: usize| rows[r].custom().is_some();
            if next.loss != rows[first].loss
                || width(end) != width(first)
                || custom(end) != custom(first)
                || cost > chunk
            {
                break;
            }
            (end, longest, mixed, copies) = (end + 1, padded, now_mixed, now_copies);
        }
        chunks.push(LossChunk {
            rows: first..end,
            start: 0,
            len: longest,
            width: width(first),
        });
        first = end;
    }
    chunks
}

/// The loss inputs of `chunk`'s rows `rows`, padded (see [`LossChunk::padded`]). Padding gets
/// weight 0 (and 0 for every other input), so its loss and gradient are 0. A row without an
/// input other than the weights gets 0 too: the loss reads such an input only when every row
/// has it (checked by [`validate_request`]). Weights have the chunk's targets per position;
/// the other inputs, one value a position, are read only by losses with one target a position.
fn padded_inputs(rows: &[Row], chunk: &LossChunk) -> LossInputs {
    let padded = rows.iter().any(|row| chunk.covered(row) < chunk.len);
    let field = |get: fn(&LossInputs) -> &Option<Vec<f32>>, default: Option<f32>, per: usize| {
        let absent = rows.iter().all(|row| get(&row.datum.loss_inputs).is_none());
        if absent && (default.is_none() || !padded) {
            return None;
        }
        let fill = default.unwrap_or(0.0);
        Some(chunk.padded(rows, 0.0, fill, per, |d| get(&d.loss_inputs).as_deref()))
    };
    LossInputs {
        target_tokens: Vec::new(),
        weights: field(|i| &i.weights, Some(1.0), chunk.width),
        logprobs: field(|i| &i.logprobs, None, 1),
        advantages: field(|i| &i.advantages, None, 1),
        sequence_ratio_mask: None,
        recorded: field(|i| &i.recorded, None, 1),
        targets_per_position: (chunk.width > 1).then_some(chunk.width),
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

    /// The log-probabilities `[rows, len * width]` of `chunk`'s targets (0 at padding); `rows`
    /// and `slots` are the chunk's. Its logits are computed and freed here.
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
        let logits = decoder.logits(&hidden, Some(&LoraBatch::new(slots)?))?;
        let width = chunk.width;
        let targets = chunk.padded(rows, 0, 0, width, |d| {
            Some(&d.loss_inputs.target_tokens[..])
        });
        let vocab = logits.size()[2];
        let lp = target_logprobs(&logits.f_view([-1, vocab])?, &targets, width)?;
        Ok(lp.f_view([n, len * width as i64])?)
    }

    /// The whole-row log-probabilities (`[len]` or `[len, K]` row after row) of the rows
    /// `needed` selects, computed without a graph; empty for the others.
    fn row_logprobs(
        &self,
        decoder: &Decoder,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
        chunks: &[LossChunk],
        needed: impl Fn(&Row) -> bool,
    ) -> Result<Vec<Vec<f32>>> {
        let mut lps: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
        tch::no_grad(|| -> Result<()> {
            for c in chunks
                .iter()
                .filter(|c| rows[c.rows.clone()].iter().any(&needed))
            {
                let part = &rows[c.rows.clone()];
                let lp = self.chunk_logprobs(decoder, c, part, &slots[c.rows.clone()])?;
                let lp = to_vec(&lp.f_view([-1])?)?;
                for (i, row) in part.iter().enumerate() {
                    if needed(row) {
                        lps[c.rows.start + i].extend_from_slice(c.unpadded(&lp, i, row));
                    }
                }
            }
            Ok(())
        })?;
        Ok(lps)
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
        let needed = |row: &Row| row.loss.needs_sequence_ratio();
        if !rows.iter().any(needed) {
            return Ok(vec![0.0; rows.len()]);
        }
        let lps = self.row_logprobs(decoder, rows, slots, chunks, needed)?;
        Ok(rows
            .iter()
            .zip(&lps)
            .map(|(row, lp)| match needed(row) {
                true => sequence_log_ratio(lp, &row.datum.loss_inputs),
                false => 0.0,
            })
            .collect())
    }

    /// Each custom-loss row's loss, metrics and `dloss/dlogprobs` (`None` for other rows): a
    /// custom loss reads the whole datum, so its rows' log-probabilities come first, without
    /// a graph; the row then trains on the linear objective with weights `-dloss/dlogprobs`,
    /// whose gradient through the model is the loss's (as the SDK's client-side path does,
    /// in one pass instead of a forward request and a backward request).
    fn custom_losses(
        &self,
        decoder: &Decoder,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
        chunks: &[LossChunk],
    ) -> Result<Vec<Option<DatumLoss>>> {
        if !rows.iter().any(|row| row.custom().is_some()) {
            return Ok(vec![None; rows.len()]);
        }
        let lps = self.row_logprobs(decoder, rows, slots, chunks, |row| row.custom().is_some())?;
        rows.iter()
            .zip(&lps)
            .map(|(row, lp)| {
                let Some(custom) = row.custom() else {
                    return Ok(None);
                };
                let shape = row.datum.target_shape();
                custom.loss.evaluate(lp, &shape, &custom.inputs).map(Some)
            })
            .collect()
    }

    /// Computes every row's outputs and loss sum (appended to `outputs` in row order). Chunks'
    /// losses are summed while they hold at most `chunk` tokens of logits, then their gradient
    /// is taken and their logits freed: one backward call for a batch that fits one chunk.
    fn run(
        &self,
        decoder: &Decoder,
        rows: &[Row],
        slots: &[Option<(&AdapterStack, i64)>],
        chunk: usize,
        outputs: &mut Vec<RowOutput>,
    ) -> Result<()> {
        let chunks = loss_chunks(rows, slots, chunk);
        let ratios = self.sequence_log_ratios(decoder, rows, slots, &chunks)?;
        let customs = self.custom_losses(decoder, rows, slots, &chunks)?;
        // A custom row runs as its linearisation: cross_entropy with weights -dloss/dlogprobs.
        let linearised: Vec<Option<Datum>> = rows
            .iter()
            .zip(&customs)
            .map(|(row, custom)| custom.as_ref().map(|c| linearise(row.datum, &c.grad)))
            .collect();
        let rows: Vec<Row> = rows
            .iter()
            .zip(&linearised)
            .map(|(row, datum)| match datum {
                Some(datum) => Row {
                    datum,
                    loss: LossFn::CrossEntropy,
                },
                None => *row,
            })
            .collect();
        let rows = rows.as_slice();
        let chunks = match customs.iter().any(Option::is_some) {
            true => loss_chunks(rows, slots, chunk),
            false => chunks,
        };
        let first = outputs.len();
        outputs.extend(rows.iter().zip(&customs).map(|(row, custom)| {
            let inputs = &row.datum.loss_inputs;
            let n = row.datum.input_tokens.len() * inputs.width();
            RowOutput {
                output: DatumOutput {
                    logprobs: Vec::with_capacity(n),
                    elementwise_loss: Vec::with_capacity(n),
                    targets_per_position: inputs.targets_per_position,
                },
                loss: 0.0,
                metrics: custom.as_ref().map(|c| c.metrics.clone()),
            }
        }));
        let mut pending = Pending::default();
        for c in &chunks {
            let part = &rows[c.rows.clone()];
            let tokens = part.len() * c.len;
            if pending.tokens + tokens > chunk {
                pending.backward()?;
            }
            let cells = tokens * c.width;
            let lp = self.chunk_logprobs(decoder, c, part, &slots[c.rows.clone()])?;
            let inputs = padded_inputs(part, c);
            let el = elementwise_loss(&part[0].loss, &lp, &inputs, &ratios[c.rows.clone()])?;
            let row_sums = el.f_sum_dim_intlist(1, false, Kind::Float)?;
            // One copy to the host for the whole chunk: log-probabilities, losses, row sums.
            let host = to_vec(&Tensor::f_cat(
                &[lp.f_view([-1])?, el.f_view([-1])?, row_sums.shallow_clone()],
                0,
            )?)?;
            let (lps, rest) = host.split_at(cells);
            let (losses, sums) = rest.split_at(cells);
            let mine = &mut outputs[first + c.rows.start..first + c.rows.end];
            for (i, (row, out)) in part.iter().zip(mine).enumerate() {
                out.output
                    .logprobs
                    .extend_from_slice(c.unpadded(lps, i, row));
                out.output
                    .elementwise_loss
                    .extend_from_slice(c.unpadded(losses, i, row));
                out.loss += f64::from(sums[i]);
            }
            if self.backward && el.requires_grad() {
                pending.add(row_sums.f_sum(Kind::Float)?, tokens)?;
            }
        }
        // A custom row's loss is the custom loss's value, not its linearisation's.
        for (out, custom) in outputs[first..].iter_mut().zip(&customs) {
            if let Some(custom) = custom {
                out.loss = custom.loss;
            }
        }
        pending.backward()
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

/// One row's outputs: per-token values, its loss and (a custom loss's) metrics.
struct RowOutput {
    output: DatumOutput,
    loss: f64,
    metrics: Option<Vec<(String, f64)>>,
}

/// `datum` as the `cross_entropy` datum whose loss has the gradient `grad` (`dloss/dlogprobs`):
/// its targets with weights `-grad`.
fn linearise(datum: &Datum, grad: &[f32]) -> Datum {
    let targets = &datum.loss_inputs;
    Datum {
        input_tokens: datum.input_tokens.clone(),
        loss_inputs: LossInputs {
            weights: Some(grad.iter().map(|g| -g).collect()),
            ..LossInputs::targets(targets.target_tokens.clone(), targets.targets_per_position)
        },
        custom: None,
    }
}

/// Loss chunks whose backward pass has not run yet: their summed loss and their tokens of
/// logits (kept alive by the graph until then).
#[derive(Default)]
struct Pending {
    sum: Option<Tensor>,
    tokens: usize,
}

impl Pending {
    fn add(&mut self, loss: Tensor, tokens: usize) -> Result<()> {
        self.sum = Some(match self.sum.take() {
            Some(sum) => sum.f_add(&loss)?,
            None => loss,
        });
        self.tokens += tokens;
        Ok(())
    }

    /// Takes the gradient of what is pending (its logits are freed).
    fn backward(&mut self) -> Result<()> {
        if let Some(sum) = self.sum.take() {
            sum.f_backward()?;
        }
        self.tokens = 0;
        Ok(())
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&t)?)
}
