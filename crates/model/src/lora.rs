//! LoRA adapters and their multi-adapter application.
//!
//! An adapter holds `A` (`[rank, in]`) and `B` (`[out, rank]`) per targeted linear layer; the
//! layer's output becomes `W x + scale · B (A x)` with `scale = alpha / rank`. Adapters live as
//! rows of stacked storage ([`crate::slab`]). A batch gathers its adapters into
//! [`AdapterStack`]s (one per layout) and a [`LoraBatch`] says which rows use which member: the
//! base matmul runs once over all rows, and each layer's deltas cost a fixed number of batched
//! kernels per stack, however many adapters the batch holds. One backward yields every member's
//! gradients, which go back to the slab with one `index_add_`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;
use crate::slab::{Entry, Field, Layout, Row, Slab};

/// Targets that read the same input and that the decoder projects with one fused matmul
/// (q/k/v, gate/up): an inference stack also multiplies that input by their `A`s at once.
const FUSED_GROUPS: [&[Target]; 2] = [
    &[Target::Q, Target::K, Target::V],
    &[Target::Gate, Target::Up],
];

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
    /// Bytes one resident adapter of this spec holds on `config`'s model: a slab row of
    /// weights, gradients and both Adam moments, f32, at its rank bucket (padding included).
    pub fn resident_bytes(&self, config: &ModelConfig) -> u64 {
        row_bytes(&Layout::new(self, config))
    }

    /// Elements a pass over an adapter of this spec holds besides its activations (see
    /// [`held_bytes`]; times the compute type's size).
    pub fn held_elements(&self, config: &ModelConfig) -> u64 {
        held_elements(&Layout::new(self, config))
    }

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

/// One adapted layer's `A` (`[rank, in]`) and `B` (`[out, rank]`): views of an adapter's row.
pub struct LoraPair {
    /// Down-projection.
    pub a: Tensor,
    /// Up-projection (zeros when fresh).
    pub b: Tensor,
}

/// A LoRA adapter over every targeted layer of one model: its weights, gradients and Adam
/// moments are one row of its layout's [`Slab`] (f32 on the model's device, whatever dtype the
/// model computes in).
pub struct LoraAdapter {
    spec: LoraSpec,
    row: Row,
    /// A backward pass added gradients that no optimizer step or `zero_grad` has consumed.
    /// Shared with the [`AdapterStack`]s the adapter is gathered into (its identity there).
    pending: Arc<AtomicBool>,
}

/// Which adapter computed something (keys and values kept for later requests): equal only for
/// one adapter object, never for another one loaded from the same weights. It keeps the
/// adapter's identity alive, so a later adapter cannot take it over.
#[derive(Debug, Clone)]
pub struct AdapterIdentity(Arc<AtomicBool>);

impl PartialEq for AdapterIdentity {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for AdapterIdentity {}

/// Bytes of one slab row of `layout`: four f32 tensors (weights, gradients, two moments).
fn row_bytes(layout: &Layout) -> u64 {
    layout.numel as u64 * 4 * std::mem::size_of::<f32>() as u64
}

impl LoraAdapter {
    /// A fresh adapter: `A` as peft initialises it (Kaiming-uniform with `a = √5`, i.e.
    /// uniform in `±1/√in`), `B` zeros, so the model's outputs are unchanged.
    pub fn new(spec: LoraSpec, config: &ModelConfig, device: Device) -> Result<Self> {
        let adapter = Self::zeroed(spec, config, device)?;
        let layout = adapter.layout().clone();
        let rank = adapter.spec.rank;
        let mut rng = SplitMix64::new(adapter.spec.seed);
        let mut values = vec![0f32; layout.numel as usize];
        for e in &layout.entries {
            let bound = 1.0 / (e.inp as f64).sqrt();
            let used = layout.rank_at(e, rank);
            // Row-major [experts, R, inp]: each expert's first `used` rows are the adapter's,
            // the rest padding.
            for x in 0..e.experts {
                let start = (e.a_offset + x * e.rank * e.inp) as usize;
                for v in &mut values[start..start + (used * e.inp) as usize] {
                    *v = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
                }
            }
        }
        adapter
            .row
            .write(Field::Params, &Tensor::from_slice(&values))?;
        Ok(adapter)
    }

    /// An adapter of `spec` whose weights, gradients and moments are all zero.
    pub fn zeroed(spec: LoraSpec, config: &ModelConfig, device: Device) -> Result<Self> {
        spec.validate(config)?;
        let slab = Slab::of(Layout::new(&spec, config), device);
        Ok(LoraAdapter {
            spec,
            row: slab.allocate()?,
            pending: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The adapter's spec.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// The row layout (bucket rank, adapted layers).
    pub fn layout(&self) -> &Arc<Layout> {
        self.row.slab().layout()
    }

    /// The adapter's row in its slab.
    pub fn row(&self) -> &Row {
        &self.row
    }

    /// The weights of `target` in `layer` (`None` layer for the unembedding), when adapted.
    pub fn pair(&self, layer: Option<usize>, target: Target) -> Option<LoraPair> {
        self.field_pair(Field::Params, layer, target).ok().flatten()
    }

    /// `field`'s `A` and `B` of `target` in `layer` (views at the adapter's own rank).
    pub fn field_pair(
        &self,
        field: Field,
        layer: Option<usize>,
        target: Target,
    ) -> Result<Option<LoraPair>> {
        let layout = self.layout();
        let Some((_, entry)) = layout.entry(layer, target) else {
            return Ok(None);
        };
        let row = self.row.view(field)?;
        let (a, b) = layout.pair_views(&row, entry, self.spec.rank)?;
        Ok(Some(LoraPair { a, b }))
    }

    /// Overwrites `field`'s `A` and `B` of `target` in `layer` (a no-op when not adapted).
    pub fn set_pair(
        &self,
        field: Field,
        layer: Option<usize>,
        target: Target,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<()> {
        let layout = self.layout().clone();
        let Some((_, entry)) = layout.entry(layer, target) else {
            return Ok(());
        };
        let slab = self.row.slab();
        let (a, b) = (slab.convert(a)?, slab.convert(b)?);
        slab.with(|t| -> Result<()> {
            let row = t.field(field).f_select(0, self.row.index())?;
            let (mut va, mut vb) = layout.pair_views(&row, entry, self.spec.rank)?;
            va.f_copy_(&a)?;
            vb.f_copy_(&b)?;
            Ok(())
        })
    }

    /// Every adapted layer's `field` with its module path, in row order.
    pub fn named_field_pairs(&self, field: Field) -> Result<Vec<(String, LoraPair)>> {
        let layout = self.layout();
        let row = self.row.view(field)?;
        layout
            .entries
            .iter()
            .map(|e| {
                let (a, b) = layout.pair_views(&row, e, self.spec.rank)?;
                Ok((e.module_path(), LoraPair { a, b }))
            })
            .collect()
    }

    /// Every adapted layer's weights with its module path, in row order.
    pub fn named_pairs(&self) -> Vec<(String, LoraPair)> {
        self.named_field_pairs(Field::Params).unwrap_or_default()
    }

    /// Bytes the adapter holds while resident: its slab row (see [`LoraSpec::resident_bytes`]).
    pub fn resident_bytes(&self) -> u64 {
        row_bytes(self.layout())
    }

    /// Trainable parameters (at the adapter's own rank, padding excluded).
    pub fn num_parameters(&self) -> i64 {
        let layout = self.layout();
        layout
            .entries
            .iter()
            .map(|e| e.experts * layout.rank_at(e, self.spec.rank) * (e.inp + e.out))
            .sum()
    }

    /// This adapter object's identity (see [`AdapterIdentity`]).
    pub fn identity(&self) -> AdapterIdentity {
        AdapterIdentity(self.pending.clone())
    }

    /// Whether a backward pass left gradients that no optimizer step has consumed yet.
    pub fn has_pending_gradients(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Discards the accumulated gradients.
    pub fn zero_grad(&self) -> Result<()> {
        self.row.zero(Field::Grads)?;
        self.zero_grad_flag();
        Ok(())
    }

    /// Records that the gradient row holds gradients no step has consumed (read back from a
    /// snapshot).
    pub(crate) fn set_pending_flag(&self) {
        self.pending.store(true, Ordering::Release);
    }

    /// Records that the gradient row was zeroed (by the caller, under the slab's lock).
    pub(crate) fn zero_grad_flag(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// The adapters of one batch that share a slab, gathered once into compute tensors: per adapted
/// layer `A` `[K, R, in]` and `B` `[K, out, R]` (member `k` is the `k`-th adapter gathered), in
/// the model's dtype. Trainable stacks make each `A` and `B` an autograd leaf, so one backward
/// yields every member's gradients at once ([`AdapterStack::accumulate`] adds them to the slab).
///
/// A stack owns copies of its members' weights, so it may outlive their borrows: a decode loop
/// keeps one across steps, adding members as sequences of new adapters join
/// ([`AdapterStack::push`]) and dropping unused ones ([`AdapterStack::compact`]).
pub struct AdapterStack {
    slab: Arc<Slab>,
    kind: Kind,
    trainable: bool,
    /// Each member's slab row (for [`AdapterStack::accumulate`]).
    slots: Vec<i64>,
    slots_t: Tensor,
    /// Each member's pending-gradient flag: its identity, and what a backward sets.
    members: Vec<Arc<AtomicBool>>,
    scales: Vec<f64>,
    scale_t: Tensor,
    /// `[K, numel]` in the compute dtype; `pairs` are views of it.
    buffer: Tensor,
    /// Per adapted layer `A` `[K, R, in]` and `B` `[K, out, R]`; for experts `[K, E, R_e, in]`
    /// and `[K, E, out, R_e]`.
    pairs: Vec<(Tensor, Tensor)>,
    /// Stacks that are not trainable, per adapted layer: for experts, `A` and `B` as the
    /// grouped matmuls of [`crate::moe`] read them (`[K·E, R_e, in]`, `[K·E, out, R_e]`,
    /// contiguous), copied once here rather than every step; `None` elsewhere.
    expert_flat: Vec<Option<(Tensor, Tensor)>>,
    /// Stacks that are not trainable: per adapted layer, every member's `A` side by side,
    /// transposed (`[in, K·R]`), and every member's `B` times its scale, stacked (`[K·R, out]`),
    /// contiguous: what [`LoraBatch`] computes an inference delta with (two matmuls per layer,
    /// the second one fused with the add, no gather).
    dense: Vec<(Tensor, Tensor)>,
    /// Stacks that are not trainable: per layer and [`FUSED_GROUPS`] index, the group's dense
    /// `A`s side by side (`[in, n·K·R]`, one target after the other) when the layout adapts
    /// every target of the group; those targets' `dense` `A`s are views of it.
    fused_a: HashMap<(usize, usize), Tensor>,
    /// Stacks that are not trainable, where [`fuses_group_b`] says so: per layer and
    /// [`FUSED_GROUPS`] index, the group's dense `B`s as one block-diagonal matrix `[n·K·R,
    /// sum of outputs]` (target `j`'s `B` in rows `j·K·R..` and its output's columns, zeros
    /// elsewhere): the product of the group's `x·A` with it is every target's delta side by
    /// side, added into the fused projection's output by one `addmm_`.
    fused_b: HashMap<(usize, usize), Tensor>,
    /// Whether `fused_b` is built: `None` decides by [`fuses_group_b`].
    group_b: Option<bool>,
}

/// Whether an inference stack of `members` members of rank `rank` on `device` multiplies a
/// fused group's `x·A` by one block-diagonal `B` ([`AdapterStack`]'s `fused_b`) instead of one
/// `B` per target: one kernel instead of `n` for `n` times the `B` arithmetic (the zero
/// blocks). On a GPU a decode layer is bound by the number of operations and the zeros cost
/// next to nothing while `members · rank` stays small (at most 128 columns per target). On the
/// CPU the zero blocks are arithmetic, not free: measured on the default model on one thread,
/// 8 rows of one adapter took 86.9 ms a step with it against 84.9 without.
fn fuses_group_b(device: Device, members: i64, rank: i64) -> bool {
    device.is_cuda() && members * rank <= 128
}

impl AdapterStack {
    /// Gathers `adapters` (all of one slab; an adapter listed twice is one member) into a
    /// stack computing in `kind`.
    pub fn new(adapters: &[&LoraAdapter], kind: Kind, trainable: bool) -> Result<Self> {
        let unique = distinct(adapters);
        let adapters = unique.as_slice();
        let Some(first) = adapters.first() else {
            return Err(ModelError::invalid("adapters", "an empty stack"));
        };
        let slab = first.row().slab().clone();
        if adapters.iter().any(|a| !Arc::ptr_eq(a.row().slab(), &slab)) {
            return Err(ModelError::invalid(
                "adapters",
                "a stack holds adapters of one layout",
            ));
        }
        if adapters.len() > slab.layout().stack_capacity() {
            return Err(too_many_members(&slab));
        }
        let slots: Vec<i64> = adapters.iter().map(|a| a.row().index()).collect();
        let buffer = gather_rows(&slab, &slots, kind)?;
        let mut stack = AdapterStack {
            slab,
            kind,
            trainable,
            slots_t: Tensor::new(),
            slots,
            members: adapters.iter().map(|a| a.pending.clone()).collect(),
            scales: adapters.iter().map(|a| a.spec().scale()).collect(),
            scale_t: Tensor::new(),
            buffer,
            pairs: Vec::new(),
            expert_flat: Vec::new(),
            dense: Vec::new(),
            fused_a: HashMap::new(),
            fused_b: HashMap::new(),
            group_b: None,
        };
        stack.rebuild_views()?;
        Ok(stack)
    }

    /// Recomputes the per-layer views, the slot index and the scales after the members changed.
    fn rebuild_views(&mut self) -> Result<()> {
        let device = self.slab.device();
        let layout = self.slab.layout().clone();
        let k = self.members.len() as i64;
        let r = layout.key.rank;
        let mut pairs = Vec::with_capacity(layout.entries.len());
        for e in &layout.entries {
            let (n, er) = (e.experts, e.rank);
            let a = self.buffer.f_narrow(1, e.a_offset, n * er * e.inp)?;
            let b = self.buffer.f_narrow(1, e.b_offset, n * e.out * er)?;
            let (a, b) = if e.is_experts() {
                (a.f_view([k, n, er, e.inp])?, b.f_view([k, n, e.out, er])?)
            } else {
                (a.f_view([k, er, e.inp])?, b.f_view([k, e.out, er])?)
            };
            pairs.push(if self.trainable {
                (a.set_requires_grad(true), b.set_requires_grad(true))
            } else {
                (a, b)
            });
        }
        self.pairs = pairs;
        self.slots_t = Tensor::from_slice(&self.slots).f_to_device(device)?;
        self.scale_t = Tensor::from_slice(&self.scales)
            .f_to_kind(self.kind)?
            .f_to_device(device)?
            .f_view([k, 1, 1])?;
        // Stacks that are not trainable: each linear layer's dense pair, and each expert
        // projection's flattened matrices (experts are added by the mixture itself, not as a
        // linear layer's: an empty dense pair keeps `dense` indexed by entry).
        self.dense.clear();
        self.expert_flat.clear();
        if !self.trainable {
            for (e, (a, b)) in layout.entries.iter().zip(&self.pairs) {
                if e.is_experts() {
                    self.expert_flat.push(Some(expert_matrices(a, b)?));
                    self.dense.push((Tensor::new(), Tensor::new()));
                    continue;
                }
                let a_t = a.f_reshape([k * r, -1])?.f_tr()?.f_contiguous()?;
                let b_s = b
                    .f_permute([0, 2, 1])?
                    .f_mul(&self.scale_t)?
                    .f_reshape([k * r, -1])?;
                self.expert_flat.push(None);
                self.dense.push((a_t, b_s));
            }
        }
        self.fused_a.clear();
        self.fused_b.clear();
        if !self.trainable {
            let mut layers: Vec<usize> = layout.entries.iter().filter_map(|e| e.layer).collect();
            layers.dedup();
            for layer in layers {
                for (group, targets) in FUSED_GROUPS.iter().enumerate() {
                    let found: Option<Vec<usize>> = targets
                        .iter()
                        .map(|&t| layout.entry(Some(layer), t).map(|(i, _)| i))
                        .collect();
                    let Some(entries) = found else {
                        continue;
                    };
                    if entries.iter().any(|&i| layout.entries[i].is_experts()) {
                        continue;
                    }
                    let parts: Vec<&Tensor> = entries.iter().map(|&i| &self.dense[i].0).collect();
                    let fused = Tensor::f_cat(&parts, 1)?;
                    for (j, &i) in entries.iter().enumerate() {
                        self.dense[i].0 = fused.f_narrow(1, j as i64 * k * r, k * r)?;
                    }
                    self.fused_a.insert((layer, group), fused);
                    if self.group_b.unwrap_or_else(|| fuses_group_b(device, k, r)) {
                        let outs: Vec<i64> =
                            entries.iter().map(|&i| layout.entries[i].out).collect();
                        let width = outs.iter().sum::<i64>();
                        let rows = entries.len() as i64 * k * r;
                        let fused = Tensor::f_zeros([rows, width], (self.kind, device))?;
                        let mut column = 0;
                        for (j, (&i, out)) in entries.iter().zip(&outs).enumerate() {
                            fused
                                .f_narrow(0, j as i64 * k * r, k * r)?
                                .f_narrow(1, column, *out)?
                                .f_copy_(&self.dense[i].1)?;
                            column += out;
                        }
                        self.fused_b.insert((layer, group), fused);
                    }
                }
            }
        }
        Ok(())
    }

    /// Overrides whether fused groups add their deltas through one block-diagonal `B`
    /// (`Some`), or leaves it to the device and the stack's size (`None`, the default: see
    /// [`fuses_group_b`]); both give the same deltas. The CPU tests check the GPU's choice with
    /// it.
    pub fn set_group_b(&mut self, fused: Option<bool>) -> Result<()> {
        self.group_b = fused;
        self.rebuild_views()
    }

    /// Adds `adapter` (of this stack's slab) as a new member and returns its index; an adapter
    /// already in the stack returns its existing index. Only for stacks that are not trainable.
    pub fn push(&mut self, adapter: &LoraAdapter) -> Result<i64> {
        Ok(self.push_many(&[adapter])?[0])
    }

    /// Adds every adapter of `adapters` not yet a member (all of this stack's slab) and returns
    /// each one's member index: one gather, one concatenation and one rebuild of the views
    /// however many join (requests joining a decode loop together bring their adapters at
    /// once). Only for stacks that are not trainable.
    pub fn push_many(&mut self, adapters: &[&LoraAdapter]) -> Result<Vec<i64>> {
        if self.trainable {
            return Err(ModelError::invalid(
                "adapters",
                "a trainable stack is fixed",
            ));
        }
        if adapters.iter().any(|a| !self.fits(a)) {
            return Err(ModelError::invalid(
                "adapters",
                "a stack holds adapters of one layout",
            ));
        }
        let mut joining = distinct(adapters);
        joining.retain(|a| self.member(a).is_none());
        if joining.len() > self.room() {
            return Err(too_many_members(&self.slab));
        }
        if !joining.is_empty() {
            let slots: Vec<i64> = joining.iter().map(|a| a.row().index()).collect();
            let rows = gather_rows(&self.slab, &slots, self.kind)?;
            self.buffer = Tensor::f_cat(&[&self.buffer, &rows], 0)?;
            self.slots.extend(slots);
            self.members
                .extend(joining.iter().map(|a| a.pending.clone()));
            self.scales.extend(joining.iter().map(|a| a.spec().scale()));
            self.rebuild_views()?;
        }
        Ok(adapters
            .iter()
            .map(|a| self.member(a).expect("every adapter is a member now"))
            .collect())
    }

    /// Keeps only the members whose `keep` flag is set (in order) and returns each old member's
    /// new index. Only for stacks that are not trainable.
    pub fn compact(&mut self, keep: &[bool]) -> Result<Vec<Option<i64>>> {
        if self.trainable || keep.len() != self.members.len() {
            return Err(ModelError::invalid(
                "keep",
                "one flag per member of a stack that is not trainable",
            ));
        }
        let mut remap = Vec::with_capacity(keep.len());
        let mut kept = Vec::new();
        for (i, &k) in keep.iter().enumerate() {
            remap.push(k.then_some(kept.len() as i64));
            if k {
                kept.push(i as i64);
            }
        }
        if kept.is_empty() {
            return Err(ModelError::invalid(
                "keep",
                "a stack keeps one member at least",
            ));
        }
        let index = Tensor::from_slice(&kept).f_to_device(self.slab.device())?;
        self.buffer = self.buffer.f_index_select(0, &index)?;
        let pick = |i: i64| i as usize;
        self.slots = kept.iter().map(|&i| self.slots[pick(i)]).collect();
        self.members = kept
            .iter()
            .map(|&i| self.members[pick(i)].clone())
            .collect();
        self.scales = kept.iter().map(|&i| self.scales[pick(i)]).collect();
        self.rebuild_views()?;
        Ok(remap)
    }

    /// Members in the stack.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Whether the stack is empty (never: [`AdapterStack::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    /// The identity of member `m`'s adapter.
    pub fn identity_of(&self, m: i64) -> AdapterIdentity {
        AdapterIdentity(self.members[m as usize].clone())
    }

    /// Whether `adapter` belongs to this stack's slab (layout and device).
    pub fn fits(&self, adapter: &LoraAdapter) -> bool {
        Arc::ptr_eq(adapter.row().slab(), &self.slab)
    }

    /// How many more members the stack takes ([`Layout::stack_capacity`]).
    pub fn room(&self) -> usize {
        self.slab.layout().stack_capacity() - self.len()
    }

    /// The member index of `adapter`, when it is in the stack.
    pub fn member(&self, adapter: &LoraAdapter) -> Option<i64> {
        self.members
            .iter()
            .position(|m| Arc::ptr_eq(m, &adapter.pending))
            .map(|i| i as i64)
    }

    fn pair(&self, layer: Option<usize>, target: Target) -> Option<&(Tensor, Tensor)> {
        self.slab
            .layout()
            .entry(layer, target)
            .map(|(i, _)| &self.pairs[i])
    }

    /// The rank of the members' unembedding LoRA, when their layout adapts the unembedding.
    pub(crate) fn unembed_rank(&self) -> Option<i64> {
        let layout = self.slab.layout();
        layout.entry(None, Target::Unembed).map(|_| layout.key.rank)
    }

    fn dense_pair(&self, layer: Option<usize>, target: Target) -> Option<&(Tensor, Tensor)> {
        self.slab
            .layout()
            .entry(layer, target)
            .and_then(|(i, _)| self.dense.get(i))
    }

    /// The autograd leaves (`A`, then `B`, of each adapted layer in row order).
    pub fn leaves(&self) -> Vec<&Tensor> {
        self.pairs.iter().flat_map(|(a, b)| [a, b]).collect()
    }

    /// Adds `grads` (aligned with [`AdapterStack::leaves`]; undefined = zero) to the members'
    /// gradient rows: one concatenation and one `index_add_`, whatever the number of members.
    pub fn accumulate(&self, grads: &[Tensor]) -> Result<()> {
        let k = self.len() as i64;
        let leaves = self.leaves();
        if grads.len() != leaves.len() {
            return Err(ModelError::invalid(
                "grads",
                format!("{} gradients for {} leaves", grads.len(), leaves.len()),
            ));
        }
        let flat = grads
            .iter()
            .zip(&leaves)
            .map(|(g, leaf)| {
                let g = if g.defined() {
                    g.shallow_clone()
                } else {
                    leaf.f_zeros_like()?
                };
                Ok(g.f_reshape([k, -1])?)
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let flat = Tensor::f_cat(&flat, 1)?.f_to_kind(Kind::Float)?;
        let _ = self
            .slab
            .with(|t| t.grads.f_index_add_(0, &self.slots_t, &flat))?;
        for pending in &self.members {
            pending.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// `A` `[K, E, R, in]` and `B` `[K, E, out, R]` of one projection of a mixture's experts as its
/// grouped matmuls read them, `[K·E, R, in]` and `[K·E, out, R]` member after member: views
/// where they can be, else copies (within the graph back to a trainable stack's leaves).
fn expert_matrices(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (k, n, r, inp) = a.size4()?;
    let out = b.size()[2];
    Ok((
        a.f_reshape([k * n, r, inp])?.f_contiguous()?,
        b.f_reshape([k * n, out, r])?.f_contiguous()?,
    ))
}

/// One stack's adapters of a mixture's experts in one layer, and which tokens use them: what
/// [`crate::moe::Experts`] adds to its experts' projections.
pub(crate) struct ExpertAdapters {
    /// The tokens (rows of the layer's `[tokens, hidden]` input) using the stack; `None`: all.
    pub tokens: Option<Tensor>,
    /// Each of those tokens' member of the stack.
    pub members: Tensor,
    /// Members in the stack.
    pub count: i64,
    /// Each member's scale (`[K]`, the compute type).
    pub scales: Tensor,
    /// Gate, up and down: every member's and expert's `A` `[K·E, R, in]` and `B`
    /// `[K·E, out, R]`.
    pub projections: [(Tensor, Tensor); 3],
}

/// `adapters` without repeats (identity: the pending-gradient flag), in first-seen order.
/// Bytes a pass over `adapters` (`None`s are base-model rows) computing in `kind` holds besides
/// its activations: its stacks' copy of each distinct adapter's weights, and either their
/// gradients (a trainable stack) or the rearranged copies an inference stack multiplies by; an
/// expert projection's matrices copied again for the grouped matmuls ([`expert_matrices`]),
/// and their gradients. [`crate::forward_backward`] takes them off its memory budget.
pub fn held_bytes(adapters: &[Option<&LoraAdapter>], kind: Kind) -> u64 {
    let adapters: Vec<&LoraAdapter> = adapters.iter().flatten().copied().collect();
    distinct(&adapters)
        .iter()
        .map(|a| held_elements(a.layout()) * kind.elt_size_in_bytes() as u64)
        .sum()
}

/// [`held_bytes`]' elements for one adapter of `layout`: two copies of its weights, and two of
/// its expert projections' grouped-matmul matrices.
fn held_elements(layout: &Layout) -> u64 {
    let copies = 2;
    let experts: i64 = layout
        .entries
        .iter()
        .filter(|e| e.is_experts())
        .map(|e| e.experts * e.rank * (e.inp + e.out))
        .sum();
    (layout.numel + experts) as u64 * copies
}

/// The error of a stack asked to hold more members than its layout allows.
fn too_many_members(slab: &Slab) -> ModelError {
    ModelError::invalid(
        "adapters",
        format!(
            "a stack of this layout holds at most {} adapters",
            slab.layout().stack_capacity()
        ),
    )
}

/// Sorts the adapters of `adapters` that are not members of `stacks` into stacks: the first
/// `stacks.len()` groups join those stacks (each within its room), every further group is a new
/// stack (adapters of one slab, at most [`Layout::stack_capacity`] of them). Each adapter is
/// placed once, in order, in the first stack or group that fits it and has room.
pub(crate) fn stack_groups<'a>(
    stacks: &[AdapterStack],
    adapters: &[&'a LoraAdapter],
) -> Vec<Vec<&'a LoraAdapter>> {
    let mut groups: Vec<Vec<&LoraAdapter>> = vec![Vec::new(); stacks.len()];
    let mut room: Vec<usize> = stacks.iter().map(AdapterStack::room).collect();
    for a in distinct(adapters) {
        if stacks.iter().any(|s| s.member(a).is_some()) {
            continue;
        }
        let fits = |i: usize| match stacks.get(i) {
            Some(stack) => stack.fits(a),
            None => Arc::ptr_eq(groups[i][0].row().slab(), a.row().slab()),
        };
        match (0..groups.len()).find(|&i| room[i] > 0 && fits(i)) {
            Some(i) => {
                groups[i].push(a);
                room[i] -= 1;
            }
            None => {
                groups.push(vec![a]);
                room.push(a.row().slab().layout().stack_capacity() - 1);
            }
        }
    }
    groups
}

fn distinct<'a>(adapters: &[&'a LoraAdapter]) -> Vec<&'a LoraAdapter> {
    let mut unique: Vec<&LoraAdapter> = Vec::with_capacity(adapters.len());
    for &a in adapters {
        if !unique.iter().any(|u| Arc::ptr_eq(&u.pending, &a.pending)) {
            unique.push(a);
        }
    }
    unique
}

/// The weights of slab rows `slots`, `[slots.len(), numel]` in `kind`.
fn gather_rows(slab: &Slab, slots: &[i64], kind: Kind) -> Result<Tensor> {
    let index = Tensor::from_slice(slots).f_to_device(slab.device())?;
    Ok(slab
        .with(|t| t.params.f_index_select(0, &index))?
        .f_to_kind(kind)?)
}

/// The distinct adapters of a batch, gathered into one [`AdapterStack`] per slab: what a
/// training batch and a sampling batch both build before their [`LoraBatch`]es.
pub(crate) struct StackSet {
    stacks: Vec<AdapterStack>,
}

impl StackSet {
    /// Stacks the distinct adapters among `adapters` (`None`s are base-model rows).
    pub(crate) fn new(
        adapters: &[Option<&LoraAdapter>],
        kind: Kind,
        trainable: bool,
    ) -> Result<Self> {
        let adapters: Vec<&LoraAdapter> = adapters.iter().flatten().copied().collect();
        let stacks = stack_groups(&[], &adapters)
            .iter()
            .map(|g| AdapterStack::new(g, kind, trainable))
            .collect::<Result<_>>()?;
        Ok(StackSet { stacks })
    }

    /// The stack and member index of `adapter`.
    pub(crate) fn member(&self, adapter: &LoraAdapter) -> Result<(&AdapterStack, i64)> {
        self.stacks
            .iter()
            .find_map(|s| s.member(adapter).map(|m| (s, m)))
            .ok_or_else(|| ModelError::invalid("adapter", "not in this batch's stacks"))
    }

    /// Adds what the backward calls of a batch left in every stack's leaves (`.grad`) to each
    /// member's gradient row. Called once, after every call succeeded, so a failed batch adds
    /// nothing.
    pub(crate) fn accumulate_leaf_grads(&self) -> Result<()> {
        for stack in &self.stacks {
            let grads = stack
                .leaves()
                .iter()
                .map(|leaf| Ok(leaf.f_grad()?))
                .collect::<Result<Vec<Tensor>>>()?;
            if grads.iter().any(Tensor::defined) {
                stack.accumulate(&grads)?;
            }
        }
        Ok(())
    }
}

/// Which members of a stack a batch part's rows use.
enum Members {
    /// Every row uses member `k` (scale given).
    One(i64, f64),
    /// Rows come in `K` consecutive blocks of `m` rows, block `k` using member `k`.
    Blocks(i64),
    /// Row `i` uses member `index[i]`; `scale` is `[rows, 1, 1]`.
    Gather { index: Tensor, scale: Tensor },
    /// Stacks that are not trainable, rows of mixed members: every row goes through every
    /// member's `A` at once (`[rows, K·R]`), `mask` (`[rows, 1, K·R]`, ones and zeros) keeps the
    /// row's own member's block, and every member's scaled `B` at once maps that back. The
    /// products with other members' blocks are zeros: wasted arithmetic, `K` times the LoRA
    /// part, which is small beside the base layer, instead of a per-row copy of `A` and `B`.
    ///
    /// `masks[n - 1]` (`[rows, 1, n·K·R]`) is that mask repeated `n` times, for the product of a
    /// fused group of `n` targets (views of one transfer).
    Dense { masks: Vec<Tensor> },
}

/// The rows of a batch that use one stack.
struct Part<'a> {
    stack: &'a AdapterStack,
    /// `None`: every row of the batch, in order; else the batch rows (ascending).
    rows: Option<Tensor>,
    members: Members,
    /// Each row's member, when the stack adapts a mixture's experts (which pick their `A` and
    /// `B` per token).
    row_members: Option<Tensor>,
}

impl Part<'_> {
    /// The part's rows of `x` (a batch-major tensor).
    fn select(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.rows {
            None => x.shallow_clone(),
            Some(rows) => x.f_index_select(0, rows)?,
        })
    }

    /// The part's rows of `x` (`[batch, seq, in]` or `[batch, in]`) as a matrix `[rows·seq, in]`.
    fn rows_of(&self, x: &Tensor) -> Result<Tensor> {
        let xs = self.select(x)?;
        if xs.dim() == 2 {
            return Ok(xs);
        }
        let inp = xs.size().last().copied().unwrap_or(1);
        Ok(xs.f_reshape([-1, inp])?)
    }

    /// `out + delta` for a stack that is not trainable, from its dense pair (`a_t` `[in, K·R]`,
    /// `b_s` `[K·R, out]` with the scales folded in): one member uses its own block of both, mixed
    /// members mask the others' blocks. Two or three kernels, the second product fused with the
    /// add into `out` (`addmm_`): decode is bound by the number of operations per layer.
    fn add_dense(&self, out: Tensor, x: &Tensor, a_t: &Tensor, b_s: &Tensor) -> Result<Tensor> {
        let r = self.stack.slab.layout().key.rank;
        let (a_t, b_s) = match self.members {
            Members::One(k, _) if self.stack.len() > 1 => {
                (a_t.f_narrow(1, k * r, r)?, b_s.f_narrow(0, k * r, r)?)
            }
            _ => (a_t.shallow_clone(), b_s.shallow_clone()),
        };
        let xa = self.rows_of(x)?.f_mm(&a_t)?;
        self.add_dense_product(out, xa, &b_s)
    }

    /// `out + (xa · b_s)` for the part's rows, `xa` (`[rows·seq, K·R]`) being their product
    /// with the dense `A` (masked here for mixed members).
    fn add_dense_product(&self, out: Tensor, xa: Tensor, b_s: &Tensor) -> Result<Tensor> {
        let xa = match &self.members {
            Members::Dense { masks } => {
                let cols = xa.size()[1];
                let width = self.stack.len() as i64 * self.stack.slab.layout().key.rank;
                let mask = masks.get((cols / width - 1) as usize).ok_or_else(|| {
                    ModelError::invalid("lora", format!("no mask for {cols} columns"))
                })?;
                let n = mask.size()[0];
                xa.f_view([n, -1, cols])?.f_mul(mask)?.f_view([-1, cols])?
            }
            _ => xa,
        };
        let width = b_s.size()[1];
        match &self.rows {
            // In place when `out`'s rows form one matrix: a matrix already (a decode step's),
            // a contiguous tensor, or one projection's columns of a fused projection's output.
            None if out.dim() == 2 => {
                let mut out = out;
                let _ = out.f_addmm_(&xa, b_s)?;
                Ok(out)
            }
            None => match out.f_view([-1, width]) {
                Ok(mut rows_of_out) => {
                    let _ = rows_of_out.f_addmm_(&xa, b_s)?;
                    Ok(out)
                }
                Err(_) => Ok(out.f_add(&xa.f_mm(b_s)?.f_view_as(&out)?)?),
            },
            Some(rows) => {
                let mut dims = out.size();
                dims[0] = rows.size()[0];
                let delta = xa.f_mm(b_s)?.f_view(dims.as_slice())?;
                Ok(out.f_index_add(0, rows, &delta)?)
            }
        }
    }

    /// The stack's fused `A` of `targets` in `layer` (one of [`FUSED_GROUPS`]), when this part
    /// multiplies by all of them at once: its rows use every member (mixed) or the stack has
    /// one member. (Rows of one member of a larger stack use that member's blocks, which are
    /// not side by side across targets.)
    fn fused_a(&self, layer: usize, targets: &[Target]) -> Option<&Tensor> {
        let group = FUSED_GROUPS.iter().position(|g| *g == targets)?;
        let whole = match self.members {
            Members::Dense { .. } => true,
            Members::One(..) => self.stack.len() == 1,
            Members::Blocks(_) | Members::Gather { .. } => false,
        };
        if whole {
            self.stack.fused_a.get(&(layer, group))
        } else {
            None
        }
    }

    /// The stack's fused `A` and block-diagonal `B` of `targets` in `layer`, when this part
    /// adds the whole group's delta with them (see [`Part::fused_a`] and [`fuses_group_b`]).
    fn fused_group(&self, layer: usize, targets: &[Target]) -> Option<(&Tensor, &Tensor)> {
        let a = self.fused_a(layer, targets)?;
        let group = FUSED_GROUPS.iter().position(|g| *g == targets)?;
        Some((a, self.stack.fused_b.get(&(layer, group))?))
    }

    /// `out` plus this part's delta for `(layer, target)` (see [`LoraBatch::add_delta`]).
    fn add_delta(
        &self,
        out: Tensor,
        x: &Tensor,
        layer: Option<usize>,
        target: Target,
    ) -> Result<Tensor> {
        let Some((a, b)) = self.stack.pair(layer, target) else {
            return Ok(out);
        };
        if let (Some((a_t, b_s)), Members::One(..) | Members::Dense { .. }) =
            (self.stack.dense_pair(layer, target), &self.members)
        {
            return self.add_dense(out, x, a_t, b_s);
        }
        let xs = self.select(x)?;
        let flat = xs.dim() == 2;
        let xs = if flat { xs.f_unsqueeze(1)? } else { xs };
        let (n, seq, inp) = (xs.size()[0], xs.size()[1], xs.size()[2]);
        let delta = match &self.members {
            Members::One(k, scale) => xs
                .f_matmul(&a.f_select(0, *k)?.f_tr()?)?
                .f_mul_scalar(*scale)?
                .f_matmul(&b.f_select(0, *k)?.f_tr()?)?,
            Members::Blocks(m) => {
                let k = n / m;
                xs.f_reshape([k, m * seq, inp])?
                    .f_bmm(&a.f_transpose(1, 2)?)?
                    .f_mul(&self.stack.scale_t)?
                    .f_bmm(&b.f_transpose(1, 2)?)?
                    .f_reshape([n, seq, -1])?
            }
            Members::Gather { index, scale } => xs
                .f_bmm(&a.f_index_select(0, index)?.f_transpose(1, 2)?)?
                .f_mul(scale)?
                .f_bmm(&b.f_index_select(0, index)?.f_transpose(1, 2)?)?,
            Members::Dense { .. } => {
                return Err(ModelError::invalid(
                    "lora",
                    "mixed members of a trainable stack must be gathered",
                ))
            }
        };
        let delta = if flat { delta.f_squeeze_dim(1)? } else { delta };
        Ok(match &self.rows {
            None => out.f_add(&delta)?,
            Some(rows) => out.f_index_add(0, rows, &delta)?,
        })
    }
}

/// The adapter assignment of one batch: which rows use which member of which [`AdapterStack`]
/// (rows outside every part run the base model). The delta of a layer costs a fixed number of
/// kernels per stack, whatever the number of adapters in it.
pub struct LoraBatch<'a> {
    parts: Vec<Part<'a>>,
    rows: i64,
}

impl<'a> LoraBatch<'a> {
    /// Row `i` of a batch of `assignment.len()` rows uses member `m` of stack `s` when
    /// `assignment[i] == Some((s, m))`, the base model when `None`.
    pub fn new(assignment: &[Option<(&'a AdapterStack, i64)>]) -> Result<Self> {
        let rows = assignment.len() as i64;
        let mut groups: Vec<(&'a AdapterStack, Vec<i64>, Vec<i64>)> = Vec::new();
        for (row, slot) in assignment.iter().enumerate() {
            let Some((stack, member)) = *slot else {
                continue;
            };
            if member < 0 || member >= stack.len() as i64 {
                return Err(ModelError::invalid(
                    "assignment",
                    format!("member {member} of a stack of {}", stack.len()),
                ));
            }
            match groups.iter_mut().find(|g| std::ptr::eq(g.0, stack)) {
                Some(g) => {
                    g.1.push(row as i64);
                    g.2.push(member);
                }
                None => groups.push((stack, vec![row as i64], vec![member])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        for (stack, batch_rows, members) in groups {
            let device = stack.slots_t.device();
            let all = batch_rows.len() as i64 == rows;
            let row_members = if stack.slab.layout().entries.iter().any(Entry::is_experts) {
                Some(Tensor::from_slice(&members).f_to_device(device)?)
            } else {
                None
            };
            let k = stack.len() as i64;
            let n = members.len() as i64;
            let members = if members.iter().all(|&m| m == members[0]) {
                Members::One(members[0], stack.scales[members[0] as usize])
            } else if n % k == 0
                && members
                    .iter()
                    .enumerate()
                    .all(|(i, &m)| m == i as i64 / (n / k))
            {
                Members::Blocks(n / k)
            } else if !stack.trainable {
                // Per row, the mask repeated 1, 2, ... up to the largest fused group's size
                // times, side by side (only the first unless the stack has block-diagonal
                // `B`s: this is sent to the device every decode step).
                let r = stack.slab.layout().key.rank as usize;
                let width = k as usize * r;
                let repeats = if stack.fused_b.is_empty() {
                    1
                } else {
                    FUSED_GROUPS.iter().map(|g| g.len()).max().unwrap_or(1)
                };
                let row_width = width * repeats * (repeats + 1) / 2;
                let mut mask = vec![0f32; members.len() * row_width];
                for (i, &m) in members.iter().enumerate() {
                    for copy in 0..repeats * (repeats + 1) / 2 {
                        let start = i * row_width + copy * width + m as usize * r;
                        mask[start..start + r].fill(1.0);
                    }
                }
                let mask = Tensor::from_slice(&mask)
                    .f_view([n, 1, row_width as i64])?
                    .f_to_kind(stack.kind)?
                    .f_to_device(device)?;
                let masks = (1..=repeats)
                    .map(|times| {
                        let start = (width * times * (times - 1) / 2) as i64;
                        mask.f_narrow(2, start, (width * times) as i64)
                    })
                    .collect::<std::result::Result<_, _>>()?;
                Members::Dense { masks }
            } else {
                let index = Tensor::from_slice(&members).f_to_device(device)?;
                let scale = stack.scale_t.f_index_select(0, &index)?;
                Members::Gather { index, scale }
            };
            parts.push(Part {
                stack,
                rows: if all {
                    None
                } else {
                    Some(Tensor::from_slice(&batch_rows).f_to_device(device)?)
                },
                members,
                row_members,
            });
        }
        Ok(LoraBatch { parts, rows })
    }

    /// The adapters of `layer`'s experts in this batch, one per stack adapting them, for a pass
    /// of `seq` tokens per row (tokens row-major).
    pub(crate) fn expert_adapters(&self, layer: usize, seq: i64) -> Result<Vec<ExpertAdapters>> {
        let mut all = Vec::new();
        for part in &self.parts {
            let (Some(members), stack) = (&part.row_members, part.stack) else {
                continue;
            };
            let layout = stack.slab.layout();
            let mut projections = Vec::with_capacity(3);
            for target in [Target::Gate, Target::Up, Target::Down] {
                match layout.entry(Some(layer), target) {
                    Some((i, e)) if e.is_experts() => {
                        projections.push(match stack.expert_flat.get(i).and_then(Option::as_ref) {
                            Some((a, b)) => (a.shallow_clone(), b.shallow_clone()),
                            None => expert_matrices(&stack.pairs[i].0, &stack.pairs[i].1)?,
                        })
                    }
                    _ => break,
                }
            }
            let Ok(projections) = <[(Tensor, Tensor); 3]>::try_from(projections) else {
                continue;
            };
            let (tokens, members) = if seq == 1 {
                (
                    part.rows.as_ref().map(Tensor::shallow_clone),
                    members.shallow_clone(),
                )
            } else {
                let positions = Tensor::f_arange(seq, (Kind::Int64, members.device()))?;
                let tokens = part
                    .rows
                    .as_ref()
                    .map(|rows| -> Result<Tensor> {
                        Ok(rows
                            .f_unsqueeze(1)?
                            .f_mul_scalar(seq)?
                            .f_add(&positions)?
                            .f_view([-1])?)
                    })
                    .transpose()?;
                (tokens, members.f_repeat_interleave_self_int(seq, 0, None)?)
            };
            all.push(ExpertAdapters {
                tokens,
                members,
                count: stack.len() as i64,
                scales: stack.scale_t.f_view([-1])?,
                projections,
            });
        }
        Ok(all)
    }

    /// Handles on every tensor the batch's deltas read (its stacks' weights and its own
    /// indices and masks): what a recorded decode step must keep alive while it may replay.
    pub(crate) fn tensors(&self) -> Vec<Tensor> {
        let mut all = Vec::new();
        for part in &self.parts {
            let stack = part.stack;
            all.extend([&stack.slots_t, &stack.scale_t, &stack.buffer].map(Tensor::shallow_clone));
            for (a, b) in stack
                .pairs
                .iter()
                .chain(&stack.dense)
                .chain(stack.expert_flat.iter().flatten())
            {
                all.extend([a.shallow_clone(), b.shallow_clone()]);
            }
            all.extend(part.row_members.iter().map(Tensor::shallow_clone));
            all.extend(stack.fused_a.values().map(Tensor::shallow_clone));
            all.extend(stack.fused_b.values().map(Tensor::shallow_clone));
            all.extend(part.rows.iter().map(Tensor::shallow_clone));
            match &part.members {
                Members::One(..) | Members::Blocks(_) => {}
                Members::Gather { index, scale } => {
                    all.extend([index.shallow_clone(), scale.shallow_clone()])
                }
                Members::Dense { masks } => all.extend(masks.iter().map(Tensor::shallow_clone)),
            }
        }
        all
    }

    /// Every one of `rows` rows uses member `member` of `stack`.
    pub fn one(stack: &'a AdapterStack, member: i64, rows: i64) -> Result<Self> {
        Self::new(&vec![Some((stack, member)); rows as usize])
    }

    /// Checks the assignment covers a batch of `rows` rows.
    pub fn check_rows(&self, rows: i64) -> Result<()> {
        if self.rows != rows {
            return Err(ModelError::invalid(
                "lora",
                format!(
                    "an adapter assignment of {} rows for a batch of {rows} rows",
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// `base + delta`, where each row gets `scale · (x A^T) B^T` of its adapter.
    ///
    /// `x` is `[batch, seq, in]` (or `[batch, in]`); `base` is the layer's output for all rows.
    pub fn add_delta(
        &self,
        base: Tensor,
        x: &Tensor,
        layer: Option<usize>,
        target: Target,
    ) -> Result<Tensor> {
        let mut out = base;
        for part in &self.parts {
            out = part.add_delta(out, x, layer, target)?;
        }
        Ok(out)
    }

    /// The outputs of `targets` (one of [`FUSED_GROUPS`]) with their deltas, from `fused`
    /// (`[.., sum of widths]`: their base outputs side by side, `widths[i]` columns for
    /// `targets[i]`, all read from `x`), as views of it where they can be.
    ///
    /// A stack that is not trainable multiplies `x` by the group's `A`s in one matmul; with a
    /// block-diagonal `B` ([`fuses_group_b`]) one more kernel adds every target's delta into
    /// `fused`, else each target's product with its `B` is added to its columns (`N - 1` more).
    pub fn add_deltas<const N: usize>(
        &self,
        fused: Tensor,
        widths: &[i64],
        x: &Tensor,
        layer: usize,
        targets: [Target; N],
    ) -> Result<[Tensor; N]> {
        let mut fused = fused;
        let mut others = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            match part.fused_group(layer, &targets) {
                Some((a, b)) => {
                    let xa = part.rows_of(x)?.f_mm(a)?;
                    fused = part.add_dense_product(fused, xa, b)?;
                }
                None => others.push(part),
            }
        }
        let mut outs: [Tensor; N] =
            fused
                .f_split_with_sizes(widths, -1)?
                .try_into()
                .map_err(|parts: Vec<Tensor>| {
                    ModelError::invalid("widths", format!("{} outputs, not {N}", parts.len()))
                })?;
        for part in others {
            let fused_xa = match part.fused_a(layer, &targets) {
                Some(a) => {
                    let xa = part.rows_of(x)?.f_mm(a)?;
                    let width = xa.size()[1] / N as i64;
                    Some((xa, width))
                }
                None => None,
            };
            for (i, &target) in targets.iter().enumerate() {
                let out = std::mem::replace(&mut outs[i], Tensor::new());
                outs[i] = match (&fused_xa, part.stack.dense_pair(Some(layer), target)) {
                    (Some((xa, width)), Some((_, b_s))) => {
                        let xa = xa.f_narrow(1, i as i64 * width, *width)?;
                        part.add_dense_product(out, xa, b_s)?
                    }
                    _ => part.add_delta(out, x, Some(layer), target)?,
                };
            }
        }
        Ok(outs)
    }
}
