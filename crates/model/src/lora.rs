//! LoRA adapters and the segmented multi-adapter application.
//!
//! An adapter holds `A` (`[rank, in]`) and `B` (`[out, rank]`) per targeted linear layer; the
//! layer's output becomes `W x + scale · B (A x)` with `scale = alpha / rank`. A [`LoraBatch`]
//! assigns contiguous row ranges of a batch to adapters: the base matmul runs once over all rows,
//! each segment adds its own adapter's delta, and autograd routes gradients to each adapter's
//! own tensors.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;

/// Linear layers LoRA can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// The unembedding (LM head).
    Unembed,
}

impl Target {
    /// The seven per-block targets, in storage order.
    pub const BLOCK: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// Every target: the block targets, then the unembedding.
    pub const ALL: [Target; 8] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
        Target::Unembed,
    ];

    fn block_index(self) -> Option<usize> {
        Target::BLOCK.iter().position(|&t| t == self)
    }

    /// The module name Hugging Face / peft use (`q_proj`, ..., `lm_head`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
            Target::Unembed => "lm_head",
        }
    }

    /// Full module path inside a `*ForCausalLM` (`model.layers.3.self_attn.q_proj`).
    pub fn module_path(self, layer: Option<usize>) -> String {
        match (self, layer) {
            (Target::Unembed, _) | (_, None) => "lm_head".to_string(),
            (Target::Q | Target::K | Target::V | Target::O, Some(i)) => {
                format!("model.layers.{i}.self_attn.{}", self.hf_name())
            }
            (_, Some(i)) => format!("model.layers.{i}.mlp.{}", self.hf_name()),
        }
    }

    /// `(out_features, in_features)` of the targeted layer.
    pub fn dims(self, c: &ModelConfig) -> (i64, i64) {
        let (h, d) = (c.hidden_size, c.head_dim);
        match self {
            Target::Q => (c.num_heads * d, h),
            Target::K | Target::V => (c.num_kv_heads * d, h),
            Target::O => (h, c.num_heads * d),
            Target::Gate | Target::Up => (c.intermediate_size, h),
            Target::Down => (h, c.intermediate_size),
            Target::Unembed => (c.vocab_size, h),
        }
    }
}

/// What an adapter looks like: the options of the SDK's LoRA config plus alpha.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    /// Rank `r` (≥ 1).
    pub rank: i64,
    /// `alpha`; the delta is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Seed of `A`'s initialisation.
    pub seed: u64,
    /// Adapt q/k/v/o.
    pub train_attn: bool,
    /// Adapt gate/up/down.
    pub train_mlp: bool,
    /// Adapt the LM head.
    pub train_unembed: bool,
}

impl LoraSpec {
    /// Checks the spec against the model; names the offending field.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        if self.rank < 1 {
            return Err(ModelError::invalid(
                "rank",
                format!("must be at least 1, got {}", self.rank),
            ));
        }
        let max_rank = config
            .hidden_size
            .min(config.head_dim * config.num_kv_heads);
        if self.rank > max_rank {
            return Err(ModelError::invalid(
                "rank",
                format!(
                    "must be at most {max_rank} for this model, got {}",
                    self.rank
                ),
            ));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(ModelError::invalid(
                "alpha",
                format!("must be a positive number, got {}", self.alpha),
            ));
        }
        if !(self.train_attn || self.train_mlp || self.train_unembed) {
            return Err(ModelError::invalid(
                "train_attn",
                "at least one of train_attn, train_mlp, train_unembed must be true",
            ));
        }
        Ok(())
    }

    /// Whether the spec adapts `target`.
    pub fn targets(&self, target: Target) -> bool {
        match target {
            Target::Q | Target::K | Target::V | Target::O => self.train_attn,
            Target::Gate | Target::Up | Target::Down => self.train_mlp,
            Target::Unembed => self.train_unembed,
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapted layer: `A` `[rank, in]` and `B` `[out, rank]`, both trainable leaves.
pub struct LoraPair {
    /// Down-projection.
    pub a: Tensor,
    /// Up-projection (zeros when fresh).
    pub b: Tensor,
}

/// A LoRA adapter over every targeted layer of one model.
pub struct LoraAdapter {
    spec: LoraSpec,
    blocks: Vec<[Option<LoraPair>; 7]>,
    unembed: Option<LoraPair>,
}

impl LoraAdapter {
    /// A fresh adapter: `A` as peft initialises it (Kaiming-uniform with `a = √5`, i.e.
    /// uniform in `±1/√in`), `B` zeros, so the model's outputs are unchanged.
    pub fn new(spec: LoraSpec, config: &ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        spec.validate(config)?;
        let mut rng = SplitMix64::new(spec.seed);
        let rank = spec.rank;
        let mut fresh = |target: Target| -> Result<Option<LoraPair>> {
            if !spec.targets(target) {
                return Ok(None);
            }
            let (out, inp) = target.dims(config);
            let bound = 1.0 / (inp as f64).sqrt();
            let values: Vec<f32> = (0..rank * inp)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::from_slice(&values).f_view([rank, inp])?;
            let b = Tensor::f_zeros([out, rank], (Kind::Float, Device::Cpu))?;
            Ok(Some(LoraPair::leaf(a, b, device, kind)?))
        };
        let mut blocks = Vec::with_capacity(config.num_layers as usize);
        for _ in 0..config.num_layers {
            let mut layer: [Option<LoraPair>; 7] = Default::default();
            for (slot, target) in layer.iter_mut().zip(Target::BLOCK) {
                *slot = fresh(target)?;
            }
            blocks.push(layer);
        }
        let unembed = fresh(Target::Unembed)?;
        Ok(LoraAdapter {
            spec,
            blocks,
            unembed,
        })
    }

    /// The adapter's spec.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// The pair adapting `target` of `layer` (`None` layer for the unembedding).
    pub fn pair(&self, layer: Option<usize>, target: Target) -> Option<&LoraPair> {
        match (target.block_index(), layer) {
            (Some(i), Some(l)) => self.blocks.get(l).and_then(|b| b[i].as_ref()),
            _ if target == Target::Unembed => self.unembed.as_ref(),
            _ => None,
        }
    }

    /// Mutable access to a pair, e.g. to set given weights.
    pub fn pair_mut(&mut self, layer: Option<usize>, target: Target) -> Option<&mut LoraPair> {
        match (target.block_index(), layer) {
            (Some(i), Some(l)) => self.blocks.get_mut(l).and_then(|b| b[i].as_mut()),
            _ if target == Target::Unembed => self.unembed.as_mut(),
            _ => None,
        }
    }

    /// Every adapted layer with its module path, in a stable order.
    pub fn named_pairs(&self) -> Vec<(String, &LoraPair)> {
        let mut out = Vec::new();
        for (l, layer) in self.blocks.iter().enumerate() {
            for (slot, target) in layer.iter().zip(Target::BLOCK) {
                if let Some(pair) = slot {
                    out.push((target.module_path(Some(l)), pair));
                }
            }
        }
        if let Some(pair) = &self.unembed {
            out.push((Target::Unembed.module_path(None), pair));
        }
        out
    }

    /// Whether a backward pass left gradients that no optimizer step has consumed yet (a
    /// gradient that cannot be read counts as pending).
    pub fn has_pending_gradients(&self) -> bool {
        self.parameters().iter().any(|p| {
            let g = p.grad();
            g.defined()
                && g.f_abs()
                    .and_then(|a| a.f_max())
                    .and_then(|m| m.f_double_value(&[]))
                    .map_or(true, |m| m != 0.0)
        })
    }

    /// Discards the accumulated gradients.
    pub fn zero_grad(&self) -> Result<()> {
        crate::adam::zero_grads(&self.parameters())
    }

    /// All trainable tensors (A then B of each pair, in [`LoraAdapter::named_pairs`] order).
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.named_pairs()
            .into_iter()
            .flat_map(|(_, p)| [&p.a, &p.b])
            .collect()
    }
}

impl LoraPair {
    /// Builds a trainable pair from given values.
    pub fn leaf(a: Tensor, b: Tensor, device: Device, kind: Kind) -> Result<Self> {
        Ok(LoraPair {
            a: a.f_to_kind(kind)?
                .f_to_device(device)?
                .set_requires_grad(true),
            b: b.f_to_kind(kind)?
                .f_to_device(device)?
                .set_requires_grad(true),
        })
    }
}

/// Rows `rows` of a batch use `adapter`.
pub struct Segment<'a> {
    /// Contiguous batch rows.
    pub rows: Range<i64>,
    /// The adapter of those rows.
    pub adapter: &'a LoraAdapter,
}

/// The adapter assignment of one batch. Either contiguous, non-overlapping row segments (rows
/// outside every segment run the base model; autograd reaches each adapter's own tensors), or,
/// for inference over many adapters, a slot per row into [`StackedAdapters`].
pub struct LoraBatch<'a> {
    segments: Vec<Segment<'a>>,
    gathered: Option<(&'a StackedAdapters, Tensor)>,
}

/// Every adapter's A and B for each targeted layer, stacked on a new first dimension (padded
/// with zeros to the largest rank, B pre-multiplied by its adapter's scale) plus an all-zero slot
/// for rows without an adapter. A batch whose rows use many different adapters then applies all
/// deltas of a layer with two gathers and two batched matmuls, instead of a few small ops per
/// adapter. Inference only (the stacks are copies, gradients do not reach the adapters).
pub struct StackedAdapters {
    stacks: std::collections::HashMap<(Option<usize>, Target), (Tensor, Tensor)>,
    zero_slot: i64,
}

impl StackedAdapters {
    /// Stacks `adapters` (slot `i` is `adapters[i]`; slot `adapters.len()` is the base model).
    pub fn new(adapters: &[&LoraAdapter], config: &ModelConfig) -> Result<Self> {
        let max_rank = adapters.iter().map(|a| a.spec().rank).max().unwrap_or(1);
        let mut stacks = std::collections::HashMap::new();
        let slots = (0..config.num_layers as usize)
            .flat_map(|l| Target::BLOCK.map(|t| (Some(l), t)))
            .chain([(None, Target::Unembed)]);
        for (layer, target) in slots {
            if adapters.iter().all(|a| a.pair(layer, target).is_none()) {
                continue;
            }
            let (out, inp) = target.dims(config);
            let mut a_parts = Vec::with_capacity(adapters.len() + 1);
            let mut b_parts = Vec::with_capacity(adapters.len() + 1);
            let like = adapters
                .iter()
                .find_map(|a| a.pair(layer, target))
                .map(|p| &p.a)
                .expect("at least one adapter targets this layer");
            let zeros = |shape: [i64; 2]| Tensor::f_zeros(shape, (like.kind(), like.device()));
            for adapter in adapters {
                match adapter.pair(layer, target) {
                    Some(p) => {
                        let r = adapter.spec().rank;
                        let pad = max_rank - r;
                        let a = p.a.f_detach()?;
                        let b = p.b.f_detach()?.f_mul_scalar(adapter.spec().scale())?;
                        a_parts.push(if pad > 0 {
                            Tensor::f_cat(&[a, zeros([pad, inp])?], 0)?
                        } else {
                            a
                        });
                        b_parts.push(if pad > 0 {
                            Tensor::f_cat(&[b, zeros([out, pad])?], 1)?
                        } else {
                            b
                        });
                    }
                    None => {
                        a_parts.push(zeros([max_rank, inp])?);
                        b_parts.push(zeros([out, max_rank])?);
                    }
                }
            }
            a_parts.push(zeros([max_rank, inp])?);
            b_parts.push(zeros([out, max_rank])?);
            stacks.insert(
                (layer, target),
                (Tensor::f_stack(&a_parts, 0)?, Tensor::f_stack(&b_parts, 0)?),
            );
        }
        Ok(StackedAdapters {
            stacks,
            zero_slot: adapters.len() as i64,
        })
    }

    /// The slot of rows that use no adapter.
    pub fn base_slot(&self) -> i64 {
        self.zero_slot
    }
}

impl<'a> LoraBatch<'a> {
    /// Each row `i` uses slot `slots[i]` of `stacks`.
    pub fn gathered(stacks: &'a StackedAdapters, slots: &[i64]) -> Result<Self> {
        if let Some(&bad) = slots.iter().find(|&&s| s < 0 || s > stacks.zero_slot) {
            return Err(ModelError::invalid(
                "slots",
                format!("slot {bad} does not exist"),
            ));
        }
        let device = stacks
            .stacks
            .values()
            .next()
            .map_or(tch::Device::Cpu, |(a, _)| a.device());
        Ok(LoraBatch {
            segments: Vec::new(),
            gathered: Some((stacks, Tensor::from_slice(slots).f_to_device(device)?)),
        })
    }

    fn add_gathered(
        stacks: &StackedAdapters,
        slots: &Tensor,
        base: Tensor,
        x: &Tensor,
        layer: Option<usize>,
        target: Target,
    ) -> Result<Tensor> {
        let Some((a, b)) = stacks.stacks.get(&(layer, target)) else {
            return Ok(base);
        };
        let flat = x.dim() == 2;
        let x3 = if flat {
            x.f_unsqueeze(1)?
        } else {
            x.shallow_clone()
        };
        let a_rows = a.f_index_select(0, slots)?;
        let b_rows = b.f_index_select(0, slots)?;
        let delta = x3
            .f_bmm(&a_rows.f_transpose(1, 2)?)?
            .f_bmm(&b_rows.f_transpose(1, 2)?)?;
        let delta = if flat { delta.f_squeeze_dim(1)? } else { delta };
        Ok(base.f_add(&delta)?)
    }

    /// Validates that segments are ordered, non-empty and disjoint.
    pub fn new(segments: Vec<Segment<'a>>) -> Result<Self> {
        let mut end = 0;
        for s in &segments {
            if s.rows.start < end || s.rows.end <= s.rows.start {
                return Err(ModelError::invalid(
                    "segments",
                    format!("segment rows {:?} overlap or are out of order", s.rows),
                ));
            }
            end = s.rows.end;
        }
        Ok(LoraBatch {
            segments,
            gathered: None,
        })
    }

    /// One adapter for every row of a batch of `rows` rows.
    pub fn single(adapter: &'a LoraAdapter, rows: i64) -> Self {
        LoraBatch {
            segments: vec![Segment {
                rows: 0..rows,
                adapter,
            }],
            gathered: None,
        }
    }

    /// Checks the segments fit a batch of `rows` rows.
    pub fn check_rows(&self, rows: i64) -> Result<()> {
        if let Some((_, slots)) = &self.gathered {
            if slots.size()[0] != rows {
                return Err(ModelError::invalid(
                    "slots",
                    format!("{} slots for a batch of {rows} rows", slots.size()[0]),
                ));
            }
        }
        match self.segments.last() {
            Some(s) if s.rows.end > rows => Err(ModelError::invalid(
                "segments",
                format!("segment rows {:?} exceed the batch of {rows} rows", s.rows),
            )),
            _ => Ok(()),
        }
    }

    /// `base + delta`, where each segment's rows get `scale · (x A^T) B^T` of its adapter.
    ///
    /// `x` is `[batch, seq, in]` (or `[batch, in]`); `base` is the layer's output for all rows.
    pub fn add_delta(
        &self,
        base: Tensor,
        x: &Tensor,
        layer: Option<usize>,
        target: Target,
    ) -> Result<Tensor> {
        if let Some((stacks, slots)) = &self.gathered {
            return Self::add_gathered(stacks, slots, base, x, layer, target);
        }
        let rows = x.size()[0];
        let mut pieces: Vec<Tensor> = Vec::new();
        let mut covered = 0;
        let mut any = false;
        let zeros = |n: i64| -> Result<Tensor> {
            let mut shape = base.size();
            shape[0] = n;
            Ok(Tensor::f_zeros(
                shape.as_slice(),
                (base.kind(), base.device()),
            )?)
        };
        for seg in &self.segments {
            if seg.rows.start > covered {
                pieces.push(zeros(seg.rows.start - covered)?);
            }
            let len = seg.rows.end - seg.rows.start;
            match seg.adapter.pair(layer, target) {
                Some(pair) => {
                    let xs = x.f_narrow(0, seg.rows.start, len)?;
                    let delta = xs
                        .f_matmul(&pair.a.f_tr()?)?
                        .f_matmul(&pair.b.f_tr()?)?
                        .f_mul_scalar(seg.adapter.spec.scale())?;
                    pieces.push(delta);
                    any = true;
                }
                None => pieces.push(zeros(len)?),
            }
            covered = seg.rows.end;
        }
        if !any {
            return Ok(base);
        }
        if covered < rows {
            pieces.push(zeros(rows - covered)?);
        }
        Ok(base.f_add(&Tensor::f_cat(&pieces, 0)?)?)
    }
}
