//! `forward` / `forward_backward` over a fused batch of several adapters' requests.
//!
//! All datums of all requests become rows of one right-padded batch; each request's rows form a
//! contiguous LoRA segment. The base model runs once, each request's loss is computed on its own
//! rows, and one backward over the sum of all requests' losses leaves in every adapter exactly the
//! gradient of its own loss (the other terms do not depend on its tensors). Gradients accumulate
//! across calls until the optimizer step zeroes them.

use tch::{Kind, Tensor};

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, LoraBatch, StackSet};
use crate::loss::{elementwise_loss, target_logprobs, LossFn, LossInputs};

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
pub fn forward_backward(
    decoder: &Decoder,
    requests: &[TrainRequest],
    backward: bool,
) -> Result<Vec<RequestOutput>> {
    for r in requests {
        validate_request(decoder.config(), &r.loss, r.data)?;
    }
    if backward {
        run(decoder, requests, true)
    } else {
        tch::no_grad(|| run(decoder, requests, false))
    }
}

fn run(decoder: &Decoder, requests: &[TrainRequest], backward: bool) -> Result<Vec<RequestOutput>> {
    let rows: Vec<&Datum> = requests.iter().flat_map(|r| r.data.iter()).collect();
    let max_len = rows.iter().map(|d| d.input_tokens.len()).max().unwrap_or(0);
    let mut ids = vec![0i64; rows.len() * max_len];
    for (r, d) in rows.iter().enumerate() {
        ids[r * max_len..r * max_len + d.input_tokens.len()].copy_from_slice(&d.input_tokens);
    }
    let ids = Tensor::from_slice(&ids).f_view([rows.len() as i64, max_len as i64])?;
    let adapters: Vec<Option<&LoraAdapter>> = requests.iter().map(|r| r.adapter).collect();
    let stacks = StackSet::new(&adapters, decoder.kind(), backward)?;
    let mut assignment = Vec::with_capacity(rows.len());
    for r in requests {
        let slot = r.adapter.map(|a| stacks.member(a)).transpose()?;
        assignment.extend(std::iter::repeat_n(slot, r.data.len()));
    }
    let lora = LoraBatch::new(&assignment)?;
    let logits = decoder.forward(&ids, Some(&lora))?;

    let mut total: Option<Tensor> = None;
    let mut results = Vec::with_capacity(requests.len());
    let mut row = 0i64;
    for r in requests {
        let mut outputs = Vec::with_capacity(r.data.len());
        let mut loss_sum = 0.0;
        for d in r.data {
            let n = d.input_tokens.len() as i64;
            let row_logits = logits.f_get(row)?.f_narrow(0, 0, n)?;
            let lp = target_logprobs(&row_logits, &d.loss_inputs.target_tokens)?;
            let el = elementwise_loss(&r.loss, &lp, &d.loss_inputs)?;
            let sum = el.f_sum(Kind::Float)?;
            loss_sum += sum.f_double_value(&[])?;
            if backward {
                total = Some(match total {
                    Some(t) => t.f_add(&sum)?,
                    None => sum,
                });
            }
            outputs.push(DatumOutput {
                logprobs: to_vec(&lp)?,
                elementwise_loss: to_vec(&el)?,
            });
            row += 1;
        }
        results.push(RequestOutput { outputs, loss_sum });
    }
    if let Some(total) = total {
        if total.requires_grad() {
            stacks.backward(&total)?;
        }
    }
    Ok(results)
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<f32>::try_from(&t)?)
}
