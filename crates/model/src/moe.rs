//! The mixture of experts of a Qwen3-MoE or Mixtral layer: a router picks `k` of `E` SwiGLU
//! experts per token and the layer's output is their outputs weighted by the router's
//! probabilities.
//!
//! Every expert runs in one grouped matmul per projection (`_grouped_mm`): the token-expert
//! pairs are sorted by expert and each expert multiplies its contiguous run of rows. The
//! number of kernels per layer is therefore fixed, whatever the number of experts or which of
//! them a batch reaches, and nothing is read back to the host (no per-expert loop over the
//! experts a batch hit, as transformers' eager path has), so a decode step stays capturable in
//! a CUDA graph.

use loraloom_mxfp4::PackedWeights;
use tch::{Kind, Tensor};

use crate::config::{Architecture, ExpertActivation, ModelConfig, MoeConfig, Routing};
use crate::error::Result;
use crate::lora::{ExpertAdapters, LoraBatch};
use crate::weights::WeightStore;

/// The most groups one grouped matmul takes: libtorch's CUDA `_grouped_mm` refuses 1024 or
/// more. A layer's experts are one group each, and a stack's expert adapters one per member and
/// expert ([`crate::slab::Layout::stack_capacity`]).
pub(crate) const MAX_GROUPS: i64 = 1023;

/// One sparse layer's router and experts (frozen).
pub struct Experts {
    /// Router `[E, hidden]`.
    router: Tensor,
    /// The router's bias `[E]` and the experts' gate/up `[E, 2·I]` (gate, then up) and down
    /// `[E, hidden]` biases, for a family that has them (GPT-OSS).
    biases: Option<ExpertBiases>,
    /// Every expert's gate and up projections, `[E, 2·I, hidden]` (transformers' fused layout:
    /// gate rows, then up rows).
    gate_up: ExpertWeights,
    /// Every expert's down projection, `[E, hidden, I]`.
    down: ExpertWeights,
    /// Experts per token.
    k: i64,
    /// Width of one expert's hidden layer.
    inter: i64,
    norm_topk_prob: bool,
    weights_in_f32: bool,
    routing: Routing,
    activation: ExpertActivation,
}

/// One projection `[E, out, in]` of every expert, as the layer keeps it.
enum ExpertWeights {
    /// In the model's type, `[E, in, out]`: a transposed view of `[E, out, in]`.
    Dense(Tensor),
    /// MXFP4, as GPT-OSS's checkpoints ship it, dequantized where it multiplies
    /// ([`loraloom_mxfp4`]).
    Packed(PackedWeights),
}

impl ExpertWeights {
    fn dense(weights: Tensor) -> Result<Self> {
        Ok(ExpertWeights::Dense(weights.f_transpose(1, 2)?))
    }

    fn shallow_clone(&self) -> Self {
        match self {
            ExpertWeights::Dense(t) => ExpertWeights::Dense(t.shallow_clone()),
            ExpertWeights::Packed(p) => ExpertWeights::Packed(p.shallow_clone()),
        }
    }

    fn numel(&self) -> i64 {
        match self {
            ExpertWeights::Dense(t) => t.numel() as i64,
            ExpertWeights::Packed(p) => p.shape().iter().product(),
        }
    }

    /// Bytes a product holds for dequantized weights (none when dense).
    fn dequantized_bytes(&self) -> u64 {
        match self {
            ExpertWeights::Dense(_) => 0,
            ExpertWeights::Packed(p) => p.working_bytes(),
        }
    }

    /// Expert-sorted rows `x` `[pairs, in]` times their experts' weights (transposed):
    /// `offsets` ends each expert's run of rows (int32, cumulative), `experts` names each
    /// row's expert. Packed weights fewer rows than experts dequantize one expert per row
    /// (a decode step); more dequantize every expert once. Both choices follow from shapes
    /// alone, so nothing is read back to the host.
    fn multiply(&self, x: &Tensor, offsets: &Tensor, experts: &Tensor) -> Result<Tensor> {
        Ok(match self {
            ExpertWeights::Dense(w) => {
                x.f_internal_grouped_mm(w, Some(offsets), None::<&Tensor>, None)?
            }
            ExpertWeights::Packed(p) if x.size()[0] < p.shape()[0] => p.gathered_mm(x, experts)?,
            ExpertWeights::Packed(p) => p.grouped_mm(x, offsets)?,
        })
    }
}

/// A GPT-OSS layer's router and expert biases.
struct ExpertBiases {
    router: Tensor,
    gate_up: Tensor,
    down: Tensor,
}

impl ExpertBiases {
    fn shallow_clone(&self) -> Self {
        ExpertBiases {
            router: self.router.shallow_clone(),
            gate_up: self.gate_up.shallow_clone(),
            down: self.down.shallow_clone(),
        }
    }

    fn numel(&self) -> i64 {
        (self.router.numel() + self.gate_up.numel() + self.down.numel()) as i64
    }
}

/// Where a family's Hub checkpoints keep a layer's router and experts: under
/// `model.layers.{i}.{block}`, `gate.weight` and `experts.{e}.{gate|up|down}.weight`.
struct HubNames {
    block: &'static str,
    gate: &'static str,
    up: &'static str,
    down: &'static str,
}

impl HubNames {
    fn of(architecture: Architecture) -> Self {
        match architecture {
            Architecture::Mixtral => HubNames {
                block: "block_sparse_moe",
                gate: "w1",
                up: "w3",
                down: "w2",
            },
            _ => HubNames {
                block: "mlp",
                gate: "gate_proj",
                up: "up_proj",
                down: "down_proj",
            },
        }
    }
}

impl Experts {
    /// Loads layer `layer`'s router and experts in either layout checkpoints carry: one tensor
    /// per expert and projection, as on the Hub (`model.layers.{layer}.mlp.experts.{e}.gate_proj`
    /// for Qwen3-MoE, `….block_sparse_moe.experts.{e}.w1` for Mixtral), or transformers 5's
    /// fused `….mlp.experts.gate_up_proj` (gate rows, then up rows) and `….mlp.experts.down_proj`.
    pub(crate) fn load(
        store: &mut WeightStore,
        layer: i64,
        c: &ModelConfig,
        moe: &MoeConfig,
    ) -> Result<Self> {
        let (e, h, i) = (moe.num_experts, c.hidden_size, moe.expert_intermediate_size);
        let fused = format!("model.layers.{layer}.mlp");
        if c.architecture == Architecture::GptOss {
            return Self::load_gpt_oss(store, &fused, c, moe);
        }
        let (router, gate_up, down) = if store.contains(&format!("{fused}.experts.gate_up_proj")) {
            (
                store.take(&format!("{fused}.gate.weight"), &[e, h])?,
                store.take(&format!("{fused}.experts.gate_up_proj"), &[e, 2 * i, h])?,
                store.take(&format!("{fused}.experts.down_proj"), &[e, h, i])?,
            )
        } else {
            let names = HubNames::of(c.architecture);
            let prefix = format!("model.layers.{layer}.{}", names.block);
            let router = store.take(&format!("{prefix}.gate.weight"), &[e, h])?;
            let mut gate_up = Vec::with_capacity(e as usize);
            let mut down = Vec::with_capacity(e as usize);
            for x in 0..e {
                let p = format!("{prefix}.experts.{x}");
                let gate = store.take(&format!("{p}.{}.weight", names.gate), &[i, h])?;
                let up = store.take(&format!("{p}.{}.weight", names.up), &[i, h])?;
                gate_up.push(Tensor::f_cat(&[gate, up], 0)?);
                down.push(store.take(&format!("{p}.{}.weight", names.down), &[h, i])?);
            }
            (
                router,
                Tensor::f_stack(&gate_up, 0)?,
                Tensor::f_stack(&down, 0)?,
            )
        };
        Self::new(
            router,
            None,
            ExpertWeights::dense(gate_up)?,
            ExpertWeights::dense(down)?,
            moe,
        )
    }

    /// The layer of `router`, `biases` and every expert's gate/up `[E, 2·I, hidden]` (gate
    /// rows, then up rows) and down `[E, hidden, I]` projections.
    fn new(
        router: Tensor,
        biases: Option<ExpertBiases>,
        gate_up: ExpertWeights,
        down: ExpertWeights,
        moe: &MoeConfig,
    ) -> Result<Self> {
        Ok(Experts {
            router,
            biases,
            gate_up,
            down,
            k: moe.experts_per_token,
            inter: moe.expert_intermediate_size,
            norm_topk_prob: moe.norm_topk_prob,
            weights_in_f32: moe.weights_in_f32,
            routing: moe.routing,
            activation: moe.activation,
        })
    }

    /// A GPT-OSS layer (`prefix` = `model.layers.{layer}.mlp`): `router.{weight,bias}` and the
    /// experts' `gate_up_proj` `[E, hidden, 2·I]` and `down_proj` `[E, I, hidden]` (inputs by
    /// outputs), in the model's type or as MXFP4 (`…_blocks` `[E, out, in/32, 16]` and
    /// `…_scales` `[E, out, in/32]`, as OpenAI ships them: [`loraloom_mxfp4`]), kept packed
    /// when the store says so ([`WeightStore::keeps_mxfp4_packed`]) and dequantized here
    /// otherwise, with `gate_up_proj_bias` and `down_proj_bias`. Gate and up outputs alternate
    /// (gate, up, gate, …); they are split into gate rows then up rows here.
    fn load_gpt_oss(
        store: &mut WeightStore,
        prefix: &str,
        c: &ModelConfig,
        moe: &MoeConfig,
    ) -> Result<Self> {
        let (e, h, i) = (moe.num_experts, c.hidden_size, moe.expert_intermediate_size);
        let router = store.take(&format!("{prefix}.router.weight"), &[e, h])?;
        let router_bias = store.take(&format!("{prefix}.router.bias"), &[e])?;
        let experts = format!("{prefix}.experts");
        // Output rows of `[E, out, ..]` with gate and up rows split.
        let split = |t: &Tensor, dim: i64| -> Result<Tensor> {
            let gate = t.f_slice(dim, 0, None, 2)?;
            let up = t.f_slice(dim, 1, None, 2)?;
            Ok(Tensor::f_cat(&[gate, up], dim)?)
        };
        // Each projection `[E, out, in]`, its gate and up rows split when `interleaved`.
        let mut weight = |name: &str, out: i64, inp: i64, interleaved: bool| {
            let rows = |t: &Tensor| match interleaved {
                true => split(t, 1),
                false => Ok(t.shallow_clone()),
            };
            let full = format!("{experts}.{name}");
            if store.contains(&full) {
                let dense = store.take(&full, &[e, inp, out])?.f_transpose(1, 2)?;
                return ExpertWeights::dense(rows(&dense)?.f_contiguous()?);
            }
            let blocks = store.take_raw(&format!("{full}_blocks"), &[e, out, inp / 32, 16])?;
            let scales = store.take_raw(&format!("{full}_scales"), &[e, out, inp / 32])?;
            let (blocks, scales) = (rows(&blocks)?, rows(&scales)?);
            if store.keeps_mxfp4_packed() {
                let packed = PackedWeights::new(
                    store.place_as(blocks, Kind::Uint8)?,
                    store.place_as(scales, Kind::Uint8)?,
                    store.kind(),
                )?;
                return Ok(ExpertWeights::Packed(packed));
            }
            let dense = PackedWeights::new(blocks, scales, store.kind())?.dequantize()?;
            ExpertWeights::dense(store.place(dense)?)
        };
        let gate_up = weight("gate_up_proj", 2 * i, h, true)?;
        let down = weight("down_proj", h, i, false)?;
        let gate_up_bias = store.take(&format!("{experts}.gate_up_proj_bias"), &[e, 2 * i])?;
        let down_bias = store.take(&format!("{experts}.down_proj_bias"), &[e, h])?;
        let biases = ExpertBiases {
            router: router_bias,
            gate_up: split(&gate_up_bias, 1)?,
            down: down_bias,
        };
        Self::new(router, Some(biases), gate_up, down, moe)
    }

    pub(crate) fn shallow_clone(&self) -> Self {
        Experts {
            router: self.router.shallow_clone(),
            biases: self.biases.as_ref().map(ExpertBiases::shallow_clone),
            gate_up: self.gate_up.shallow_clone(),
            down: self.down.shallow_clone(),
            k: self.k,
            inter: self.inter,
            norm_topk_prob: self.norm_topk_prob,
            weights_in_f32: self.weights_in_f32,
            routing: self.routing,
            activation: self.activation,
        }
    }

    /// Parameters of the layer; with `active`, those one token multiplies by (the router and
    /// `k` of the experts).
    pub(crate) fn num_parameters(&self, active: bool) -> i64 {
        let experts = self.gate_up.numel() + self.down.numel();
        let experts = if active {
            experts / self.router.size()[0] * self.k
        } else {
            experts
        };
        self.router.numel() as i64 + experts + self.biases.as_ref().map_or(0, ExpertBiases::numel)
    }

    /// Parameters of the layer kept packed, and the bytes they take.
    pub(crate) fn packed_size(&self) -> (u64, u64) {
        [&self.gate_up, &self.down]
            .into_iter()
            .filter_map(|w| match w {
                ExpertWeights::Packed(p) => Some((w.numel() as u64, p.bytes())),
                ExpertWeights::Dense(_) => None,
            })
            .fold((0, 0), |(n, b), (pn, pb)| (n + pn, b + pb))
    }

    /// Bytes the layer holds for dequantized weights while it runs (the larger projection's;
    /// none when the experts are dense).
    pub(crate) fn dequantized_bytes(&self) -> u64 {
        self.gate_up
            .dequantized_bytes()
            .max(self.down.dequantized_bytes())
    }

    /// `residual + moe(h)` for `h` `[.., hidden]` (`residual` shaped as `h`), each expert's
    /// projections with the LoRA deltas `lora` holds for `layer`'s experts.
    ///
    /// An expert adapter gives each expert its own `A` and `B` for gate, up and down
    /// ([`crate::slab::expert_rank`]). Its deltas run as grouped matmuls too: one stack's
    /// token-expert pairs sorted by (member, expert), each group multiplying by its member's
    /// and expert's `A` and `B`, added into the experts' outputs where those pairs sit; a fixed
    /// number of kernels per stack, whatever its members or experts.
    ///
    /// Routing as transformers' `Qwen3MoeTopKRouter` and `MixtralTopKRouter`: softmax of the
    /// router logits in f32, the top `k`, renormalised when the config says so, rounded to the
    /// model's type unless they weigh the outputs in f32 (Mixtral). The `k`
    /// outputs of a token are summed by one batched matmul with its weights, in a fixed order
    /// (no atomic adds: the same batch gives the same bits). Each intermediate is dropped as
    /// soon as the next exists: what [`crate::memory::PassCost`] counts for a pass without a
    /// graph.
    ///
    /// On a GPU, libtorch runs `_grouped_mm` as one kernel for bf16 (compute capability 8.0 and
    /// up); for other element types its fallback reads the offsets back to the host, which a
    /// recorded decode step cannot do (it then stays eager).
    pub(crate) fn forward_onto(
        &self,
        h: &Tensor,
        residual: &Tensor,
        lora: Option<&LoraBatch>,
        layer: usize,
    ) -> Result<Tensor> {
        let hidden = self.router.size()[1];
        let seq = if h.dim() == 3 { h.size()[1] } else { 1 };
        let x = h.f_reshape([-1, hidden])?;
        let rows = x.size()[0];
        let experts = self.router.size()[0];
        let logits = x.f_linear(&self.router, self.biases.as_ref().map(|b| &b.router))?;
        let (weights, chosen) = match self.routing {
            Routing::SoftmaxThenTopK => logits
                .f_softmax(-1, Kind::Float)?
                .f_topk(self.k, -1, true, true)?,
            Routing::TopKThenSoftmax => {
                let (top, chosen) = logits.f_topk(self.k, -1, true, true)?;
                (top.f_softmax(-1, top.kind())?, chosen)
            }
        };
        drop(logits);
        let weights = if self.norm_topk_prob {
            weights.f_div(&weights.f_sum_dim_intlist(-1, true, Kind::Float)?)?
        } else {
            weights
        };
        let mix_kind = if self.weights_in_f32 {
            Kind::Float
        } else {
            x.kind()
        };
        let weights = weights.f_to_kind(mix_kind)?;
        // The (token, slot) pairs sorted by expert: `order[j]` is the pair at sorted position
        // `j`, `offsets[e]` the end of expert `e`'s run.
        let chosen = chosen.f_view([-1])?;
        let (sorted_experts, order) = chosen.f_sort(0, false)?;
        // Each sorted pair's expert's bias of `biases` (`[E, width]`).
        let bias_of = |biases: &Tensor| biases.f_index_select(0, &sorted_experts);
        let counts = Tensor::f_zeros([experts], (Kind::Int64, x.device()))?.f_index_add(
            0,
            &chosen,
            &chosen.f_ones_like()?,
        )?;
        let offsets = counts.f_cumsum(0, Kind::Int)?;
        let tokens = order.f_floor_divide_scalar(self.k)?;
        // Where each pair sits in the sorted order (the inverse permutation).
        let sorted_at = order.f_argsort(0, false)?;
        let adapters = match lora {
            Some(batch) => batch.expert_adapters(layer, seq)?,
            None => Vec::new(),
        };
        let plans = adapters
            .iter()
            .map(|a| self.plan(a, &chosen, &sorted_at))
            .collect::<Result<Vec<_>>>()?;
        let act = {
            let xs = x.f_index_select(0, &tokens)?;
            let mut gate_up = self.gate_up.multiply(&xs, &offsets, &sorted_experts)?;
            if let Some(b) = &self.biases {
                gate_up = gate_up.f_add(&bias_of(&b.gate_up)?)?;
            }
            for (a, plan) in adapters.iter().zip(&plans) {
                let xs = xs.f_index_select(0, &plan.positions)?;
                let delta = Tensor::f_cat(
                    &[
                        plan.delta(&xs, &a.projections[0])?,
                        plan.delta(&xs, &a.projections[1])?,
                    ],
                    1,
                )?;
                gate_up = gate_up.f_index_add(0, &plan.positions, &delta)?;
            }
            drop(xs);
            self.activate(&gate_up)?
        };
        // Back in (token, slot) order, each token's `k` outputs weighted and summed.
        let out = {
            let mut sorted = self.down.multiply(&act, &offsets, &sorted_experts)?;
            if let Some(b) = &self.biases {
                sorted = sorted.f_add(&bias_of(&b.down)?)?;
            }
            for (a, plan) in adapters.iter().zip(&plans) {
                let delta =
                    plan.delta(&act.f_index_select(0, &plan.positions)?, &a.projections[2])?;
                sorted = sorted.f_index_add(0, &plan.positions, &delta)?;
            }
            drop(act);
            sorted.f_index_select(0, &sorted_at)?
        };
        let mixed = weights
            .f_unsqueeze(1)?
            .f_bmm(&out.f_view([rows, self.k, hidden])?.f_to_kind(mix_kind)?)?
            .f_to_kind(x.kind())?;
        drop(out);
        Ok(residual.f_add(&mixed.f_view_as(residual)?)?)
    }
}

impl Experts {
    /// The gated activation of gate/up outputs `[pairs, 2·I]` (gate columns, then up).
    fn activate(&self, gate_up: &Tensor) -> Result<Tensor> {
        let gate = gate_up.f_narrow(-1, 0, self.inter)?;
        let up = gate_up.f_narrow(-1, self.inter, self.inter)?;
        Ok(match self.activation {
            ExpertActivation::Silu => gate.f_silu()?.f_mul(&up)?,
            ExpertActivation::ClampedSwiglu { alpha, limit } => {
                let gate = gate.f_clamp_max(limit)?;
                let glu = gate.f_mul(&gate.f_mul_scalar(alpha)?.f_sigmoid()?)?;
                up.f_clamp(-limit, limit)?.f_add_scalar(1.0)?.f_mul(&glu)?
            }
        })
    }
}

/// Where one stack's token-expert pairs sit and how its grouped matmuls split them.
struct Plan {
    /// Each of the stack's pairs (sorted by member, then expert): its position in the
    /// expert-sorted order of the layer's pairs.
    positions: Tensor,
    /// End of each (member, expert) group among them (`[K·E]`, `i32`).
    offsets: Tensor,
    /// Each pair's member's scale, `[pairs, 1]`.
    scale: Tensor,
}

impl Plan {
    /// `scale · (x Aᵀ) Bᵀ` for the stack's pairs' rows `x` (in plan order), each with its
    /// member's and expert's `A` (`[K·E, R, in]`) and `B` (`[K·E, out, R]`).
    fn delta(&self, x: &Tensor, (a, b): &(Tensor, Tensor)) -> Result<Tensor> {
        let offsets = Some(&self.offsets);
        let xa = x
            .f_internal_grouped_mm(&a.f_transpose(1, 2)?, offsets, None::<&Tensor>, None)?
            .f_mul(&self.scale)?;
        Ok(xa.f_internal_grouped_mm(&b.f_transpose(1, 2)?, offsets, None::<&Tensor>, None)?)
    }
}

impl Experts {
    /// The [`Plan`] of stack `a`'s tokens, given every token's chosen experts (`[tokens, k]`)
    /// and where each (token, slot) pair sits in the expert-sorted order.
    fn plan(&self, a: &ExpertAdapters, chosen: &Tensor, sorted_at: &Tensor) -> Result<Plan> {
        let experts = self.router.size()[0];
        let device = chosen.device();
        let chosen = chosen.f_view([-1, self.k])?;
        let (tokens, chosen) = match &a.tokens {
            Some(t) => (t.shallow_clone(), chosen.f_index_select(0, t)?),
            None => (
                Tensor::f_arange(chosen.size()[0], (Kind::Int64, device))?,
                chosen.shallow_clone(),
            ),
        };
        let slots = Tensor::f_arange(self.k, (Kind::Int64, device))?;
        let pairs = tokens
            .f_unsqueeze(1)?
            .f_mul_scalar(self.k)?
            .f_add(&slots)?
            .f_view([-1])?;
        let keys = a
            .members
            .f_unsqueeze(1)?
            .f_mul_scalar(experts)?
            .f_add(&chosen)?
            .f_view([-1])?;
        let (sorted_keys, order) = keys.f_sort(0, false)?;
        let counts = Tensor::f_zeros([a.count * experts], (Kind::Int64, device))?.f_index_add(
            0,
            &keys,
            &keys.f_ones_like()?,
        )?;
        Ok(Plan {
            positions: sorted_at.f_index_select(0, &pairs.f_index_select(0, &order)?)?,
            offsets: counts.f_cumsum(0, Kind::Int)?,
            scale: a
                .scales
                .f_index_select(0, &sorted_keys.f_floor_divide_scalar(experts)?)?
                .f_unsqueeze(1)?,
        })
    }
}
