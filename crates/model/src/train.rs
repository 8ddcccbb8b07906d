//! `forward` / `forward_backward` over a fused batch of several adapters' requests.
//!
//! All datums of all requests become rows of right-padded batches (one, unless the memory budget
//! splits them into micro-batches); each row uses its request's adapter. The base model runs once
//! per micro-batch, each request's loss is computed on its own rows, and the backward pass of the
//! sum of all requests' losses leaves in every adapter exactly the gradient of its own loss (the
//! other terms do not depend on its tensors). Gradients accumulate across calls until the
//! optimizer step zeroes them.

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

/// The loss side of one micro-batch: logits, log-probabilities and losses, a chunk of tokens at
/// a time. With a backward pass the chunks read a detached copy of the hidden states, so each
/// chunk's gradient can be taken (and its logits freed) before the next; the summed gradient
/// with respect to the hidden states then goes back through the blocks once.
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

    /// The log-probabilities of `targets` at row `r`'s positions from `start` (one chunk of
    /// the row's logits, computed and freed here).
    fn chunk_logprobs(
        &self,
        decoder: &Decoder,
        r: usize,
        start: usize,
        targets: &[i64],
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let hidden = self.hidden.f_narrow(0, r as i64, 1)?.f_narrow(
            1,
            start as i64,
            targets.len() as i64,
        )?;
        let logits = decoder.logits(&hidden, lora)?.f_squeeze_dim(0)?;
        target_logprobs(&logits, targets)
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
        let mut pending: Option<(Tensor, usize)> = None;
        for (r, (row, slot)) in rows.iter().zip(slots).enumerate() {
            let lora = slot
                .map(|(stack, k)| LoraBatch::one(stack, k, 1))
                .transpose()?;
            let n = row.datum.input_tokens.len();
            let mut output = DatumOutput {
                logprobs: Vec::with_capacity(n),
                elementwise_loss: Vec::with_capacity(n),
            };
            let mut loss_sum = 0.0;
            // GSPO's losses need the whole sequence's ratio first: one pass without gradients.
            let sequence_log_ratio = if row.loss.needs_sequence_ratio() {
                let mut lp_all: Vec<f32> = Vec::with_capacity(n);
                tch::no_grad(|| -> Result<()> {
                    for start in (0..n).step_by(chunk.max(1)) {
                        let len = chunk.min(n - start);
                        let targets = &row.datum.loss_inputs.target_tokens[start..start + len];
                        let lp = self.chunk_logprobs(decoder, r, start, targets, lora.as_ref())?;
                        lp_all.extend(to_vec(&lp)?);
                    }
                    Ok(())
                })?;
                sequence_log_ratio(&lp_all, &row.datum.loss_inputs)
            } else {
                0.0
            };
            for start in (0..n).step_by(chunk.max(1)) {
                let len = chunk.min(n - start);
                let inputs = row.datum.loss_inputs.slice(start..start + len);
                let lp =
                    self.chunk_logprobs(decoder, r, start, &inputs.target_tokens, lora.as_ref())?;
                let el = elementwise_loss(&row.loss, &lp, &inputs, sequence_log_ratio)?;
                let sum = el.f_sum(Kind::Float)?;
                loss_sum += sum.f_double_value(&[])?;
                output.logprobs.extend(to_vec(&lp)?);
                output.elementwise_loss.extend(to_vec(&el)?);
                if self.backward && sum.requires_grad() {
                    pending = match pending.take() {
                        Some((total, tokens)) if tokens + len <= chunk => {
                            Some((total.f_add(&sum)?, tokens + len))
                        }
                        Some((total, _)) => {
                            total.f_backward()?;
                            Some((sum, len))
                        }
                        None => Some((sum, len)),
                    };
                }
            }
            outputs.push((output, loss_sum));
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
