//! What a training or scoring pass holds in memory, and how a batch is split so that it fits a
//! budget.
//!
//! A pass over `T` padded tokens keeps, for its backward pass, every layer's activations: about
//! `T · layers · (8h + 6q + 6kv + 5i)` elements (`h` the residual width, `q`/`kv` the query and
//! key/value widths, `i` the MLP width), 2.0 MB per token on SmolLM2-135M in f32. The loss adds
//! `T · vocab` logits and their gradient unless it is computed in chunks, and rows longer than
//! a sliding window a `[T, T]` mask ([`PassCost::window_bytes`]). [`plan`] splits a
//! batch's rows into consecutive micro-batches whose activations fit the budget (gradients
//! accumulate across them, so the result is that of one pass); a row that alone does not fit is
//! run with activation checkpointing, which keeps only each layer's input and recomputes one
//! layer at a time during the backward pass. A row that does not fit even so is refused.

use std::ops::Range;

use tch::Kind;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// A budget that never splits a batch (tests and benchmarks that measure one pass).
pub const NO_LIMIT: u64 = u64::MAX;

/// Safety margin over the element counts below (LoRA products, allocator slack, kernel
/// workspaces, and on a GPU the repeated key/value heads of masked grouped-query attention:
/// `2q` more per layer, ~6% on Llama shapes).
const MARGIN: f64 = 1.25;

/// Bytes of one f32 logit, its softmax and its gradient, per vocabulary entry and token: what a
/// loss chunk holds per token.
const LOSS_BYTES_PER_LOGIT: u64 = 16;

/// The fraction of a budget given to one loss chunk's logits.
const LOSS_SHARE: u64 = 16;

/// A loss chunk never holds fewer tokens than this (unless the row is shorter).
const MIN_LOSS_CHUNK: usize = 16;

/// How a micro-batch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No graph (a `forward`): one layer's temporaries at a time.
    NoGrad,
    /// Every layer's activations kept for the backward pass.
    Full,
    /// Only each layer's input kept; layers are recomputed one at a time during the backward
    /// pass (about one more forward pass of compute).
    Checkpointed,
}

/// Per-token memory of a pass over one model, from its configuration and element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassCost {
    elem: u64,
    layers: u64,
    hidden: u64,
    /// Elements one layer keeps per token for its backward pass.
    saved_per_layer: u64,
    /// Elements one layer's forward holds at once per token when no graph is kept.
    transient_per_layer: u64,
    vocab: u64,
    /// The sliding window, when some layer attends within one.
    window: Option<u64>,
    /// Bytes of packed weights one layer dequantizes at once, forward or backward
    /// ([`crate::Decoder::dequantized_weight_bytes`]).
    dequantized_weights: u64,
}

impl PassCost {
    /// Bytes of one element of the compute type.
    pub fn element_bytes(&self) -> u64 {
        self.elem
    }

    /// The cost model of `config` run in `kind`.
    pub fn new(config: &ModelConfig, kind: Kind) -> Self {
        let h = config.hidden_size as u64;
        let q = (config.num_heads * config.head_dim) as u64;
        let kv = (config.num_kv_heads * config.head_dim) as u64;
        let i = config.intermediate_size as u64;
        // Per token, a dense MLP keeps 5 and holds 3 hidden-layer widths. A mixture of experts
        // keeps 5 for each of its `k` experts, the token's `k` copies into them and two of their
        // outputs (sorted, then in token order) and the router's probabilities; without a graph
        // it holds at most 4 expert widths (gate and up, the activation and its product) and
        // 2 copies ([`crate::moe::Experts::forward_onto`]). Expert adapters (the SDK's default
        // targets include them) add per token and expert another copy of its input and of its
        // activation, its gate/up and down deltas and the outputs they are added into: 3 expert
        // widths and 3 hidden widths kept, 2 and 1 more held at once without a graph. A layer
        // of either kind is costed as the larger.
        let (mlp_saved, mlp_transient) = match &config.moe {
            None => (5 * i, 3 * i),
            Some(moe) => {
                let k = moe.experts_per_token as u64;
                let ki = k * moe.expert_intermediate_size as u64;
                let e = moe.num_experts as u64;
                (
                    (5 * i).max(8 * ki + 6 * k * h + 2 * e),
                    (3 * i).max(6 * ki + 3 * k * h + e),
                )
            }
        };
        // Attention with sinks runs on copies of q, k and v whose heads are
        // `crate::decoder::SINK_PAD` wider, and its output is as wide: all four kept for the
        // backward pass (on a GPU, a masked grouped pass widens its repeated key/value heads:
        // within the margin, as the repeated heads themselves are).
        let sinks = if config.attention_sinks {
            let d = config.head_dim as u64;
            (2 * q + 2 * kv) * (d + crate::decoder::SINK_PAD as u64) / d
        } else {
            0
        };
        PassCost {
            elem: kind.elt_size_in_bytes() as u64,
            layers: config.num_layers as u64,
            hidden: h,
            saved_per_layer: 8 * h + 6 * q + 6 * kv + mlp_saved + sinks,
            transient_per_layer: 4 * h + 2 * q + 2 * kv + mlp_transient + sinks,
            vocab: config.vocab_size as u64,
            window: config.sliding_window.map(|w| w as u64),
            dequantized_weights: 0,
        }
    }

    /// This cost with `bytes` of packed weights dequantized at once by a layer while it runs
    /// (a pass holds them whatever its size).
    pub fn with_dequantized_weights(self, bytes: u64) -> Self {
        PassCost {
            dequantized_weights: bytes,
            ..self
        }
    }

    /// Bytes of the sliding layers' mask in a pass over rows padded to `len` tokens: one
    /// additive `[len, len]` mask in the model's type and the three boolean ones it is made
    /// from, once rows reach past the window (nothing before: [`crate::Decoder`] builds none).
    pub fn window_bytes(&self, len: u64) -> u64 {
        match self.window {
            Some(window) if len > window => len * len * (self.elem + 3),
            _ => 0,
        }
    }

    /// Bytes a micro-batch of `rows` rows padded to `len` tokens holds at its peak in `mode`,
    /// the loss excluded: its activations, the sliding layers' mask and the weights a layer
    /// dequantizes.
    pub fn pass_bytes(&self, rows: usize, len: usize, mode: Mode) -> u64 {
        self.activation_bytes((rows * len) as u64, mode)
            + self.window_bytes(len as u64)
            + self.dequantized_weights
    }

    /// Bytes of activations a micro-batch of `tokens` padded tokens holds at its peak in `mode`
    /// (the loss excluded: see [`PassCost::loss_bytes`]).
    pub fn activation_bytes(&self, tokens: u64, mode: Mode) -> u64 {
        let per_token = match mode {
            Mode::NoGrad => self.transient_per_layer + 2 * self.hidden,
            // The kept activations, plus one layer's gradients during the backward pass.
            Mode::Full => (self.layers + 1) * self.saved_per_layer + 2 * self.hidden,
            // Every layer's input, plus one recomputed layer and its gradients.
            Mode::Checkpointed => {
                self.layers * self.hidden + 2 * self.saved_per_layer + 2 * self.hidden
            }
        };
        (tokens as f64 * (per_token * self.elem) as f64 * MARGIN) as u64
    }

    /// Bytes a loss chunk of `tokens` tokens holds (logits in f32, their softmax and gradient).
    pub fn loss_bytes(&self, tokens: u64) -> u64 {
        tokens * self.vocab * LOSS_BYTES_PER_LOGIT
    }

    /// The least memory one row of `len` tokens can run in (checkpointed when it needs a
    /// graph), with a loss chunk of the smallest size.
    pub fn least_bytes(&self, len: usize, backward: bool) -> u64 {
        let mode = if backward {
            Mode::Checkpointed
        } else {
            Mode::NoGrad
        };
        self.pass_bytes(1, len, mode) + self.loss_bytes(MIN_LOSS_CHUNK.min(len) as u64)
    }
}

/// Consecutive rows of a batch run as one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Indices into the batch's rows.
    pub rows: Range<usize>,
    /// Padded length (the longest row's).
    pub len: usize,
    /// How the pass runs.
    pub mode: Mode,
}

/// How a batch runs within a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Covering every row once, in order.
    pub micro_batches: Vec<MicroBatch>,
    /// Tokens per loss chunk: logits are computed, and their gradient taken, this many tokens
    /// at a time (padded tokens: a chunk holds several rows when their padded lengths fit).
    pub loss_chunk: usize,
}

/// Splits rows of `lengths` tokens (in batch order) into consecutive micro-batches whose
/// activations fit `budget` bytes together with one loss chunk. A row that alone does not fit
/// runs checkpointed; one that does not fit even so is an error naming the limit.
pub fn plan(lengths: &[usize], backward: bool, cost: &PassCost, budget: u64) -> Result<Plan> {
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let per_loss_token = cost.loss_bytes(1).max(1);
    let loss_chunk = ((budget / LOSS_SHARE / per_loss_token) as usize)
        .max(MIN_LOSS_CHUNK)
        .min((longest * lengths.len()).max(1));
    let activations = budget.saturating_sub(cost.loss_bytes(loss_chunk as u64));
    let mode = if backward { Mode::Full } else { Mode::NoGrad };
    let mut micro_batches: Vec<MicroBatch> = Vec::new();
    for (row, &len) in lengths.iter().enumerate() {
        if let Some(last) = micro_batches.last_mut() {
            let padded = last.len.max(len);
            if last.mode == mode
                && cost.pass_bytes(last.rows.len() + 1, padded, mode) <= activations
            {
                last.rows.end = row + 1;
                last.len = padded;
                continue;
            }
        }
        let fits = |mode| cost.pass_bytes(1, len, mode) <= activations;
        let alone = if fits(mode) {
            mode
        } else if backward && fits(Mode::Checkpointed) {
            Mode::Checkpointed
        } else {
            return Err(too_large(
                row,
                len,
                cost.least_bytes(len, backward),
                budget,
                cost.dequantized_weights,
            ));
        };
        micro_batches.push(MicroBatch {
            rows: row..row + 1,
            len,
            mode: alone,
        });
    }
    Ok(Plan {
        micro_batches,
        loss_chunk,
    })
}

/// Refuses, at submission, datums that no plan can fit in `budget`.
pub fn check_fits(lengths: &[usize], backward: bool, cost: &PassCost, budget: u64) -> Result<()> {
    for (row, &len) in lengths.iter().enumerate() {
        let need = cost.least_bytes(len, backward);
        if need > budget {
            return Err(too_large(row, len, need, budget, cost.dequantized_weights));
        }
    }
    Ok(())
}

fn too_large(row: usize, len: usize, need: u64, budget: u64, dequantized: u64) -> ModelError {
    ModelError::invalid(
        format!("data[{row}].model_input"),
        format!(
            "{len} tokens need about {} of activation memory even with activation checkpointing, more than the {} per pass this server's memory budget (--memory-budget) leaves for activations{}",
            human_bytes(need),
            human_bytes(budget),
            if dequantized > 0 {
                format!(" (of which {} are one layer's MXFP4 experts dequantized as it runs: see --mxfp4)", human_bytes(dequantized))
            } else {
                String::new()
            }
        ),
    )
}

/// `bytes` as users read it (`1.5 GiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Reads a size as users write it: plain bytes or a number with a unit (`512M`, `8G`, `8GiB`,
/// `1.5T`; K/M/G/T are powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(ModelError::invalid(
                "memory_budget",
                format!("unknown unit `{other}` in `{text}` (use B, K, M, G or T)"),
            ))
        }
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok((n * scale as f64) as u64),
        _ => Err(ModelError::invalid(
            "memory_budget",
            format!("`{text}` is not a positive size"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 1e5,
            rope_scaling: None,
            max_position_embeddings: 8192,
            sliding_window: None,
            sliding_layers: vec![false; 30],
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            eos_token_ids: vec![2],
            moe: None,
            attention_sinks: false,
        }
    }

    #[test]
    fn a_batch_that_fits_is_one_pass() {
        let cost = PassCost::new(&smollm2(), Kind::Float);
        let plan = plan(&[128, 100, 128, 7], true, &cost, 8 << 30).unwrap();
        assert_eq!(
            plan.micro_batches,
            vec![MicroBatch {
                rows: 0..4,
                len: 128,
                mode: Mode::Full
            }]
        );
        // A sixteenth of the budget holds 682 tokens of logits; the batch has 4 x 128 padded.
        assert_eq!(plan.loss_chunk, 512);
    }

    #[test]
    fn a_large_batch_splits_in_order_and_a_long_row_is_checkpointed() {
        let cost = PassCost::new(&smollm2(), Kind::Float);
        let budget = 3 << 30;
        let lengths = [512, 512, 512, 8192, 64, 64];
        let plan = plan(&lengths, true, &cost, budget).unwrap();
        let covered: Vec<usize> = plan
            .micro_batches
            .iter()
            .flat_map(|m| m.rows.clone())
            .collect();
        assert_eq!(covered, (0..lengths.len()).collect::<Vec<_>>());
        assert!(plan.micro_batches.len() > 2, "{plan:?}");
        let long = plan
            .micro_batches
            .iter()
            .find(|m| m.rows.contains(&3))
            .unwrap();
        assert_eq!((long.rows.clone(), long.mode), (3..4, Mode::Checkpointed));
        for m in &plan.micro_batches {
            let tokens = (m.rows.len() * m.len) as u64;
            assert!(
                cost.activation_bytes(tokens, m.mode) + cost.loss_bytes(plan.loss_chunk as u64)
                    <= budget
            );
        }
        // Without a graph the same rows need no checkpointing.
        let fwd = super::plan(&lengths, false, &cost, budget).unwrap();
        assert!(fwd.micro_batches.iter().all(|m| m.mode == Mode::NoGrad));
    }

    #[test]
    fn rows_past_a_sliding_window_count_its_mask() {
        let mut config = smollm2();
        config.sliding_window = Some(1024);
        config.sliding_layers = vec![true; 30];
        let cost = PassCost::new(&config, Kind::BFloat16);
        assert_eq!(cost.window_bytes(1024), 0, "no mask within the window");
        assert_eq!(cost.window_bytes(4096), 4096 * 4096 * 5);
        // Within the window the plan is the dense model's; past it, a row needs the mask too.
        let dense = PassCost::new(&smollm2(), Kind::BFloat16);
        assert_eq!(cost.least_bytes(1024, true), dense.least_bytes(1024, true));
        assert_eq!(
            cost.least_bytes(8192, true),
            dense.least_bytes(8192, true) + 8192 * 8192 * 5
        );
        let budget = dense.least_bytes(8192, true) + 1;
        check_fits(&[8192], true, &dense, budget).unwrap();
        assert!(check_fits(&[8192], true, &cost, budget).is_err());
        assert!(plan(&[8192], true, &cost, budget).is_err());
    }

    #[test]
    fn packed_weights_dequantized_by_a_layer_count_once_per_pass() {
        let cost = PassCost::new(&smollm2(), Kind::Float);
        let packed = cost.with_dequantized_weights(1 << 30);
        for mode in [Mode::NoGrad, Mode::Full, Mode::Checkpointed] {
            for (rows, len) in [(1, 1), (8, 512)] {
                assert_eq!(
                    packed.pass_bytes(rows, len, mode),
                    cost.pass_bytes(rows, len, mode) + (1 << 30)
                );
            }
        }
        // A row that fit beside the activations alone may not beside a layer's weights.
        let budget = cost.least_bytes(64, true) + cost.loss_bytes(16) + (512 << 20);
        assert!(plan(&[64], true, &cost, budget).is_ok());
        assert!(plan(&[64], true, &packed, budget).is_err());
    }

    #[test]
    fn what_cannot_fit_names_the_row_and_the_limit() {
        let cost = PassCost::new(&smollm2(), Kind::Float);
        let err = plan(&[16, 8192], true, &cost, 64 << 20).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("data[1]") && text.contains("--memory-budget"),
            "{text}"
        );
        assert!(check_fits(&[16, 8192], true, &cost, 64 << 20).is_err());
        check_fits(&[16, 8192], true, &cost, 4 << 30).unwrap();
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("64mb").unwrap(), 64 << 20);
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("8 parsecs").is_err());
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
