//! The decoder-only transformer shared by the Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE and
//! Mixtral families: embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP or a mixture of
//! SwiGLU experts ([`crate::moe`]), LM head.
//!
//! Base weights are frozen (`requires_grad = false`) and never copied: every caller shares one
//! [`Decoder`] through `Arc`. LoRA deltas come from a [`LoraBatch`] passed to each call.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::{LoraBatch, Target};
use crate::moe::Experts;
use crate::rope::Rope;
use crate::weights::WeightStore;

/// A linear layer `y = x W^T + b` with frozen weights.
pub struct Linear {
    /// `[out, in]`.
    weight: Tensor,
    /// `[out]`, when the family has one.
    bias: Option<Tensor>,
    /// `weight` transposed (`[in, out]`, a view): what a matrix input multiplies, made once
    /// instead of by a view call per layer and step.
    weight_t: Tensor,
}

impl Linear {
    /// The layer of `weight` (`[out, in]`) and `bias`.
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight_t = weight.f_tr()?;
        Ok(Linear {
            weight,
            bias,
            weight_t,
        })
    }

    fn shallow_clone(&self) -> Self {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            weight_t: self.weight_t.shallow_clone(),
        }
    }

    fn load(store: &mut WeightStore, prefix: &str, out: i64, inp: i64, bias: bool) -> Result<Self> {
        let weight = store.take(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(store.take(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Linear::new(weight, bias)
    }

    /// `x W^T + b` for `x` `[.., in]`. A matrix (the rows of a decode step) takes one `mm`, or
    /// one `addmm` with the bias, what `linear` itself calls for it, without `linear`'s layers
    /// of dispatch and transposition.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim() != 2 {
            return Ok(x.f_linear(&self.weight, self.bias.as_ref())?);
        }
        Ok(match &self.bias {
            Some(bias) => bias.f_addmm(x, &self.weight_t)?,
            None => x.f_mm(&self.weight_t)?,
        })
    }

    /// `residual + forward(x)` (`residual` shaped as the output): one `addmm` where the layer
    /// has no bias, instead of a matmul and an add (decode is bound by the number of
    /// operations per layer); the sum is rounded once.
    fn forward_onto(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.bias.is_some() {
            return Ok(residual.f_add(&self.forward(x)?)?);
        }
        if x.dim() == 2 && residual.dim() == 2 {
            return Ok(residual.f_addmm(x, &self.weight_t)?);
        }
        let inp = x.size().last().copied().unwrap_or(1);
        let out = residual.size().last().copied().unwrap_or(1);
        Ok(residual
            .f_reshape([-1, out])?
            .f_addmm(&x.f_reshape([-1, inp])?, &self.weight_t)?
            .f_view_as(residual)?)
    }

    fn num_parameters(&self) -> i64 {
        self.weight.numel() as i64 + self.bias.as_ref().map_or(0, |b| b.numel() as i64)
    }
}

/// Frozen linear layers that read the same input (q/k/v, gate/up), stored as one linear layer
/// of `[sum of outputs, in]`: one matmul computes every output, which are then views of one
/// result. Fewer, larger kernels per layer than one matmul per projection, with the same
/// products per output element.
pub struct FusedLinear {
    /// The layers' weights (and biases) stacked along the output dimension.
    stacked: Linear,
    /// Each layer's output width, in order.
    outs: Vec<i64>,
}

impl FusedLinear {
    fn shallow_clone(&self) -> Self {
        FusedLinear {
            stacked: self.stacked.shallow_clone(),
            outs: self.outs.clone(),
        }
    }

    /// Loads the layers `(prefix, out)` of input width `inp` and stacks them.
    fn load(
        store: &mut WeightStore,
        layers: &[(String, i64)],
        inp: i64,
        bias: bool,
    ) -> Result<Self> {
        let parts = layers
            .iter()
            .map(|(prefix, out)| Linear::load(store, prefix, *out, inp, bias))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        Ok(FusedLinear {
            stacked: Linear::new(
                Tensor::f_cat(&weights, 0)?,
                biases.map(|b| Tensor::f_cat(&b, 0)).transpose()?,
            )?,
            outs: layers.iter().map(|(_, out)| *out).collect(),
        })
    }

    /// The `N` layers' outputs for `x` (`[.., in]`), with any LoRA delta `lora` holds for
    /// `(layer, targets[i])`: views `[.., out_i]` of one matmul's result where they can be.
    fn forward<const N: usize>(
        &self,
        x: &Tensor,
        lora: Option<&LoraBatch>,
        layer: usize,
        targets: [Target; N],
    ) -> Result<[Tensor; N]> {
        let fused = self.stacked.forward(x)?;
        if let Some(batch) = lora {
            return batch.add_deltas(fused, &self.outs, x, layer, targets);
        }
        fused
            .f_split_with_sizes(self.outs.as_slice(), -1)?
            .try_into()
            .map_err(|parts: Vec<Tensor>| {
                ModelError::invalid("projection", format!("{} outputs, not {N}", parts.len()))
            })
    }
}

/// RMSNorm computed in f32, as transformers does.
pub struct RmsNorm {
    weight: Tensor,
    /// The normalised (last) dimension's size, the weight's.
    dim: i64,
    eps: f64,
    /// The weight is kept in f32 and multiplies the f32 normalised value before one rounding to
    /// the input's type (GPT-OSS's norms, which transformers keeps in f32).
    in_f32: bool,
}

impl RmsNorm {
    fn shallow_clone(&self) -> Self {
        RmsNorm {
            weight: self.weight.shallow_clone(),
            dim: self.dim,
            eps: self.eps,
            in_f32: self.in_f32,
        }
    }

    fn load(store: &mut WeightStore, name: &str, dim: i64, eps: f64, in_f32: bool) -> Result<Self> {
        let kind = if in_f32 { Kind::Float } else { store.kind() };
        Ok(RmsNorm {
            weight: store.take_as(name, &[dim], kind)?,
            dim,
            eps,
            in_f32,
        })
    }

    /// `weight * (x / rms(x))` by libtorch's `rms_norm`, which normalises in f32 (transformers'
    /// `hidden.to(float32)`) and multiplies by the weight in the same operation (one fused
    /// kernel on a GPU, where the spelled-out formula took seven and decode is bound by the
    /// number of operations per layer). transformers rounds the normalised value to `x`'s
    /// dtype before the weight multiplies it: in bf16 that is one more rounding there; in f32
    /// the two agree to rounding. A norm kept in f32 takes `x` in f32 and rounds its output.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.in_f32 && x.kind() != Kind::Float {
            return Ok(x
                .f_to_kind(Kind::Float)?
                .f_rms_norm([self.dim], Some(&self.weight), self.eps)?
                .f_to_kind(x.kind())?);
        }
        Ok(x.f_rms_norm([self.dim], Some(&self.weight), self.eps)?)
    }
}

struct Attention {
    /// q, k and v.
    qkv: FusedLinear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Each query head's sink logit `[heads]` (GPT-OSS): see [`attend_with_sinks`].
    sinks: Option<Tensor>,
}

struct Mlp {
    /// gate and up.
    gate_up: FusedLinear,
    down: Linear,
}

/// What follows attention in a block.
enum Ffn {
    /// One MLP for every token.
    Dense(Mlp),
    /// A routed mixture of experts (a sparse layer of a Qwen3-MoE model).
    Sparse(Experts),
}

struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    ffn: Ffn,
}

/// The frozen base model.
pub struct Decoder {
    config: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
    device: Device,
    kind: Kind,
}

/// Whether a checkpoint's MXFP4 weights (GPT-OSS's experts, as OpenAI ships them) stay packed
/// where the model runs ([`loraloom_mxfp4`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mxfp4Policy {
    /// Dequantized into the model's type at load: 16 bits a weight in bf16 against 4.25
    /// packed, and no dequantization while the model runs.
    Dequantize,
    /// Kept packed; each layer dequantizes the experts it multiplies by, forward and backward,
    /// and drops them.
    Packed,
    /// Packed when dequantizing them would take more than this many bytes.
    PackedAbove(u64),
}

/// What a pass does with the key/value cache.
enum Cache<'a> {
    /// Nothing (training and scoring passes).
    None,
    /// Collects every layer's keys and values (a prefill).
    Fill(&'a mut Vec<(Tensor, Tensor)>),
    /// Writes the new tokens' keys and values after the cache's window and attends over both.
    Append(&'a KvCache),
}

/// Elements an attention mask's rows are aligned to (what fused attention kernels require of a
/// mask without copying it).
const MASK_ALIGN: i64 = 16;

/// Rotary tables and the attention mask of one pass.
struct Attend {
    /// Broadcastable to `[batch, seq, heads, head_dim]`.
    cos: Tensor,
    sin: Tensor,
    /// Additive `[batch, 1, seq, keys]` in the model's element type (0 = attend, -inf = not),
    /// see [`Decoder::attend_at`]; `None` means plain causal attention.
    mask: Option<Tensor>,
    /// The mask of the layers attending within the sliding window (`mask`, or causal
    /// attention, narrowed to it: [`Decoder::windowed`]); `None` when no layer slides or the
    /// pass is too short to reach past the window (those layers then read `mask`).
    window: Option<Tensor>,
}

/// What every layer of a decode step (one token per row) reads.
struct Step {
    rows: i64,
    /// The rotary rotation of each row's position as matrices `[rows, head_dim, head_dim]`
    /// ([`Rope::rotation`]), applied to queries and keys by one batched matmul each.
    rotation: Tensor,
    /// Additive `[rows · kv_heads, 1, 1, keys]` over the cache's window and the new column
    /// (row-major: each row's mask once per key/value head); over the whole buffers when
    /// `column` is set.
    mask: Tensor,
    /// `mask` of the layers attending within the sliding window; `None` when no layer slides or
    /// no row reaches past the window yet (those layers then read `mask`).
    window: Option<Tensor>,
    /// Where the step writes its keys and values: `None` after the cache's window (the window
    /// is what attention reads); `Some(at)`, a `[1]` column read on the device, for a step whose
    /// kernels do not depend on the host's view of the cache ([`Decoder::decode_step_static`]).
    column: Option<Tensor>,
}

/// A pass run with activation checkpointing, waiting for its backward pass
/// ([`Decoder::hidden_states_checkpointed`]).
pub struct Checkpointed {
    ctx: Attend,
    /// The input of every block (no graph).
    inputs: Vec<Tensor>,
    /// The last block's output, an autograd leaf.
    top: Tensor,
    /// Final-normed hidden states `[batch, seq, hidden]`, with a graph back to `top`.
    pub hidden: Tensor,
}

/// Back-propagates `grad` (the gradient of a loss with respect to `output`) into `output`'s
/// graph: the gradient of `sum(output · grad)` with `grad` constant is exactly `grad`.
pub(crate) fn backward_with(output: &Tensor, grad: &Tensor) -> Result<()> {
    output
        .f_mul(&grad.f_detach()?.f_to_kind(output.kind())?)?
        .f_sum(Kind::Float)?
        .f_backward()?;
    Ok(())
}

/// `base` (a projection's output for `x`) plus any LoRA delta the batch holds for
/// `(layer, target)`.
fn with_delta(
    base: Tensor,
    x: &Tensor,
    lora: Option<&LoraBatch>,
    layer: usize,
    target: Target,
) -> Result<Tensor> {
    match lora {
        Some(batch) => batch.add_delta(base, x, Some(layer), target),
        None => Ok(base),
    }
}

impl Decoder {
    /// Loads a Hugging Face checkpoint directory (`config.json` + safetensors), MXFP4 weights
    /// dequantized.
    ///
    /// dtype: f32 on CPU, bf16 on CUDA unless `kind` overrides it.
    pub fn load(dir: &Path, device: Device, kind: Option<Kind>) -> Result<Self> {
        Self::load_with(dir, device, kind, Mxfp4Policy::Dequantize)
    }

    /// [`Decoder::load`], MXFP4 weights (GPT-OSS's experts) kept packed or dequantized as
    /// `mxfp4` says.
    pub fn load_with(
        dir: &Path,
        device: Device,
        kind: Option<Kind>,
        mxfp4: Mxfp4Policy,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                path: dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let config = ModelConfig::from_dir(dir)?;
        let kind = kind.unwrap_or(match device {
            Device::Cpu => Kind::Float,
            _ => Kind::BFloat16,
        });
        let mut store = WeightStore::load(dir, kind, device)?;
        let dequantized = store.mxfp4_dequantized_bytes();
        store.keep_mxfp4_packed(match mxfp4 {
            Mxfp4Policy::Dequantize => false,
            Mxfp4Policy::Packed => true,
            Mxfp4Policy::PackedAbove(limit) => dequantized > limit,
        });
        let decoder = Self::from_store(config, &mut store, device, kind)?;
        let leftover = store.leftover();
        if !leftover.is_empty() {
            tracing::warn!(count = leftover.len(), first = %leftover[0], "unused tensors in checkpoint");
        }
        Ok(decoder)
    }

    fn from_store(
        config: ModelConfig,
        store: &mut WeightStore,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let embed = store.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(c.num_layers as usize);
        let f32_norms = c.architecture.norms_in_f32();
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = c.architecture.qk_norm();
            let norm = |store: &mut WeightStore, name: &str| {
                RmsNorm::load(
                    store,
                    &format!("{p}.self_attn.{name}.weight"),
                    d,
                    c.rms_norm_eps,
                    false,
                )
            };
            let attn = Attention {
                qkv: FusedLinear::load(
                    store,
                    &[
                        (format!("{p}.self_attn.q_proj"), c.num_heads * d),
                        (format!("{p}.self_attn.k_proj"), c.num_kv_heads * d),
                        (format!("{p}.self_attn.v_proj"), c.num_kv_heads * d),
                    ],
                    h,
                    c.qkv_bias,
                )?,
                o: Linear::load(
                    store,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    c.num_heads * d,
                    c.o_bias,
                )?,
                q_norm: if qk_norm {
                    Some(norm(store, "q_norm")?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(norm(store, "k_norm")?)
                } else {
                    None
                },
                sinks: if c.attention_sinks {
                    Some(store.take(&format!("{p}.self_attn.sinks"), &[c.num_heads])?)
                } else {
                    None
                },
            };
            let sparse = c.moe.as_ref().filter(|moe| moe.sparse_layers[i as usize]);
            let ffn = match sparse {
                Some(moe) => Ffn::Sparse(Experts::load(store, i, c, moe)?),
                None => Ffn::Dense(Mlp {
                    gate_up: FusedLinear::load(
                        store,
                        &[
                            (format!("{p}.mlp.gate_proj"), c.intermediate_size),
                            (format!("{p}.mlp.up_proj"), c.intermediate_size),
                        ],
                        h,
                        c.mlp_bias,
                    )?,
                    down: Linear::load(
                        store,
                        &format!("{p}.mlp.down_proj"),
                        h,
                        c.intermediate_size,
                        c.mlp_bias,
                    )?,
                }),
            };
            blocks.push(Block {
                input_norm: RmsNorm::load(
                    store,
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                    f32_norms,
                )?,
                attn,
                post_attn_norm: RmsNorm::load(
                    store,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    c.rms_norm_eps,
                    f32_norms,
                )?,
                ffn,
            });
        }
        let final_norm = RmsNorm::load(store, "model.norm.weight", h, c.rms_norm_eps, f32_norms)?;
        let lm_head = if c.tie_word_embeddings {
            // A tied checkpoint may still carry a copy; one copy in memory is enough.
            let _ = store.take_optional("lm_head.weight", &[c.vocab_size, h])?;
            None
        } else {
            Some(store.take("lm_head.weight", &[c.vocab_size, h])?)
        };
        let rope = Rope::new(c, device)?;
        Ok(Decoder {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            rope,
            device,
            kind,
        })
    }

    /// Another handle on the same weights (no copy): how each worker thread gets its own
    /// decoder, since tensors are `Send` but not `Sync`.
    pub fn shallow_clone(&self) -> Decoder {
        let blocks = self
            .blocks
            .iter()
            .map(|b| Block {
                input_norm: b.input_norm.shallow_clone(),
                attn: Attention {
                    qkv: b.attn.qkv.shallow_clone(),
                    o: b.attn.o.shallow_clone(),
                    q_norm: b.attn.q_norm.as_ref().map(RmsNorm::shallow_clone),
                    k_norm: b.attn.k_norm.as_ref().map(RmsNorm::shallow_clone),
                    sinks: b.attn.sinks.as_ref().map(Tensor::shallow_clone),
                },
                post_attn_norm: b.post_attn_norm.shallow_clone(),
                ffn: match &b.ffn {
                    Ffn::Dense(m) => Ffn::Dense(Mlp {
                        gate_up: m.gate_up.shallow_clone(),
                        down: m.down.shallow_clone(),
                    }),
                    Ffn::Sparse(experts) => Ffn::Sparse(experts.shallow_clone()),
                },
            })
            .collect();
        Decoder {
            config: self.config.clone(),
            embed: self.embed.shallow_clone(),
            blocks,
            final_norm: self.final_norm.shallow_clone(),
            lm_head: self.lm_head.as_ref().map(Tensor::shallow_clone),
            rope: self.rope.shallow_clone(),
            device: self.device,
            kind: self.kind,
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Element type of the weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Bytes the keys and values of one token take in a decode cache (every layer).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        2 * (c.num_layers * c.num_kv_heads * c.head_dim) as u64
            * self.kind.elt_size_in_bytes() as u64
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> i64 {
        self.count_parameters(false)
    }

    /// Parameters one token's pass multiplies by: all of a dense model's, and of a mixture of
    /// experts only the `k` experts a token is routed to (what FLOPs per token scale with).
    pub fn active_parameters(&self) -> i64 {
        self.count_parameters(true)
    }

    fn count_parameters(&self, active: bool) -> i64 {
        let mut n = self.embed.numel() as i64 + self.final_norm.weight.numel() as i64;
        n += self.lm_head.as_ref().map_or(0, |t| t.numel() as i64);
        for b in &self.blocks {
            n += b.attn.qkv.stacked.num_parameters() + b.attn.o.num_parameters();
            n += match &b.ffn {
                Ffn::Dense(m) => m.gate_up.stacked.num_parameters() + m.down.num_parameters(),
                Ffn::Sparse(experts) => experts.num_parameters(active),
            };
            n += b.input_norm.weight.numel() as i64 + b.post_attn_norm.weight.numel() as i64;
            for norm in [&b.attn.q_norm, &b.attn.k_norm].into_iter().flatten() {
                n += norm.weight.numel() as i64;
            }
            n += b.attn.sinks.as_ref().map_or(0, |s| s.numel() as i64);
        }
        n
    }

    /// The sparse layers' experts, when the model has any.
    fn experts(&self) -> impl Iterator<Item = &Experts> {
        self.blocks.iter().filter_map(|b| match &b.ffn {
            Ffn::Sparse(experts) => Some(experts),
            Ffn::Dense(_) => None,
        })
    }

    /// Bytes the weights take where the model runs (packed experts as packed; the few norm
    /// weights a family keeps in f32 counted in the model's type).
    pub fn weight_bytes(&self) -> u64 {
        let (packed, packed_bytes) = self
            .experts()
            .map(Experts::packed_size)
            .fold((0, 0), |(n, b), (pn, pb)| (n + pn, b + pb));
        (self.num_parameters() as u64 - packed) * self.kind.elt_size_in_bytes() as u64
            + packed_bytes
    }

    /// Bytes of packed MXFP4 weights one layer dequantizes at once while it runs (0 when the
    /// experts are dense): a pass holds them on top of its activations ([`PassCost`]).
    ///
    /// [`PassCost`]: crate::memory::PassCost
    pub fn dequantized_weight_bytes(&self) -> u64 {
        self.experts()
            .map(Experts::dequantized_bytes)
            .max()
            .unwrap_or(0)
    }

    /// One line describing the model, for logs.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let context = match c.sliding_window {
            Some(window) => format!(
                "context {} · sliding window {window} on {} of {} layers",
                c.max_position_embeddings,
                c.sliding_layers.iter().filter(|&&s| s).count(),
                c.num_layers
            ),
            None => format!("context {}", c.max_position_embeddings),
        };
        format!(
            "{} · {} layers · hidden {} · {} heads / {} kv heads · vocab {} · {context} · {:.1}M parameters · {:?} on {:?}",
            c.architecture.name(),
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
            self.num_parameters() as f64 / 1e6,
            self.kind,
            self.device,
        ) + if self.dequantized_weight_bytes() > 0 {
            " · experts in MXFP4"
        } else {
            ""
        }
    }

    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Logits `[batch, seq, vocab]` for right-padded token ids `[batch, seq]`.
    ///
    /// Every row starts at position 0 and attends causally, so padding at the end of a row
    /// never influences that row's real positions. LoRA deltas come from `lora` when given.
    pub fn forward(&self, input_ids: &Tensor, lora: Option<&LoraBatch>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, lora)?;
        self.logits(&hidden, lora)
    }

    /// Final-normed hidden states `[batch, seq, hidden]` (causal, every row from position 0).
    pub fn hidden_states(&self, input_ids: &Tensor, lora: Option<&LoraBatch>) -> Result<Tensor> {
        let (ids, ctx) = self.causal_from_start(input_ids, lora)?;
        self.run_blocks(&ids, &ctx, lora, Cache::None)
    }

    /// [`Decoder::hidden_states`] with activation checkpointing: the blocks run without a graph,
    /// keeping only each block's input; only the final norm's graph is built. The returned pass
    /// holds the hidden states (whose graph reaches the last block's output) until
    /// [`Decoder::backward_checkpointed`] recomputes the blocks one at a time. Memory: one
    /// `[batch, seq, hidden]` tensor per layer instead of every layer's activations.
    pub fn hidden_states_checkpointed(
        &self,
        input_ids: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<Checkpointed> {
        let (ids, ctx) = self.causal_from_start(input_ids, lora)?;
        let (inputs, top) = tch::no_grad(|| -> Result<(Vec<Tensor>, Tensor)> {
            let mut x = Tensor::f_embedding(&self.embed, &ids, -1, false, false)?;
            let mut inputs = Vec::with_capacity(self.blocks.len());
            for (i, block) in self.blocks.iter().enumerate() {
                let (out, _, _) = self.block_forward(block, i, &x, &ctx, None, lora)?;
                inputs.push(x);
                x = out;
            }
            Ok((inputs, x))
        })?;
        let top = top.set_requires_grad(true);
        let hidden = self.final_norm.forward(&top)?;
        Ok(Checkpointed {
            ctx,
            inputs,
            top,
            hidden,
        })
    }

    /// The backward pass of a checkpointed pass, given the gradient of the loss with respect to
    /// its hidden states: each block is recomputed from its kept input, with a graph, and its
    /// gradient taken before the next; LoRA leaves accumulate their gradients (`.grad`).
    pub fn backward_checkpointed(
        &self,
        pass: Checkpointed,
        lora: Option<&LoraBatch>,
        grad: &Tensor,
    ) -> Result<()> {
        let Checkpointed {
            ctx,
            inputs,
            top,
            hidden,
        } = pass;
        backward_with(&hidden, grad)?;
        drop(hidden);
        let mut grad = top.f_grad()?;
        drop(top);
        for (i, input) in inputs.into_iter().enumerate().rev() {
            if !grad.defined() {
                break;
            }
            let x = input.f_detach()?.set_requires_grad(i > 0);
            let (out, _, _) = self.block_forward(&self.blocks[i], i, &x, &ctx, None, lora)?;
            if out.requires_grad() {
                backward_with(&out, &grad)?;
            }
            drop(out);
            grad = if i > 0 { x.f_grad()? } else { Tensor::new() };
        }
        Ok(())
    }

    /// Runs prompts `[rows, seq]` (no padding) and returns the final hidden states
    /// `[rows, seq, hidden]` with the cache of their keys and values, ready for
    /// [`Decoder::decode_step`].
    pub fn prefill(
        &self,
        input_ids: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<(Tensor, KvCache)> {
        let (ids, ctx) = self.causal_from_start(input_ids, lora)?;
        let rows = ids.size()[0];
        let mut layers = Vec::with_capacity(self.blocks.len());
        let hidden = self.run_blocks(&ids, &ctx, lora, Cache::Fill(&mut layers))?;
        Ok((
            hidden,
            KvCache::from_prefill(layers, vec![0; rows as usize]),
        ))
    }

    /// [`Decoder::prefill`] of prompts of different lengths in one pass: row `i` of `input_ids`
    /// (`[rows, seq]`) holds its prompt in columns `pads[i]..seq` (left padding, any token id
    /// before). Padding columns attend only to themselves, real ones causally to the row's real
    /// columns; the cache records the padding so decode steps never attend to it.
    pub fn prefill_padded(
        &self,
        input_ids: &Tensor,
        pads: &[i64],
        lora: Option<&LoraBatch>,
    ) -> Result<(Tensor, KvCache)> {
        if pads.iter().all(|&p| p == 0) {
            return self.prefill(input_ids, lora);
        }
        let ids = self.checked_ids(input_ids, lora)?;
        let (rows, seq) = (ids.size()[0], ids.size()[1]);
        if pads.len() as i64 != rows || pads.iter().any(|&p| p < 0 || p >= seq) {
            return Err(ModelError::invalid(
                "pads",
                format!("{} pads for {rows} rows of {seq} columns", pads.len()),
            ));
        }
        let device = self.device;
        let pad = Tensor::from_slice(pads)
            .f_to_device(device)?
            .f_view([rows, 1])?;
        let cols = Tensor::f_arange(seq, (Kind::Int64, device))?;
        let positions = cols.f_unsqueeze(0)?.f_sub(&pad)?.f_clamp_min(0)?;
        // [rows, 1, seq (query), seq (key)]
        let query = cols.f_view([1, seq, 1])?;
        let key = cols.f_view([1, 1, seq])?;
        let causal = key.f_le_tensor(&query)?;
        let real_key = key.f_ge_tensor(&pad.f_view([rows, 1, 1])?)?;
        let own = key.f_eq_tensor(&query)?;
        let mask = causal.f_logical_and(&real_key)?.f_logical_or(&own)?;
        let window = self.windowed(&mask, &key, &query, seq)?;
        let ctx = self.attend_at(&positions, mask.f_unsqueeze(1)?, window)?;
        let mut layers = Vec::with_capacity(self.blocks.len());
        let hidden = self.run_blocks(&ids, &ctx, lora, Cache::Fill(&mut layers))?;
        Ok((hidden, KvCache::from_prefill(layers, pads.to_vec())))
    }

    /// Appends one token per row (`ids`, one per cache row) to `cache` and returns the final
    /// hidden state of each row, `[rows, hidden]`.
    pub fn decode_step(
        &self,
        ids: &[i64],
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let positions = self.checked_step(ids, cache, lora)?;
        let [ids, positions, pad] = self.upload([ids, &positions, &cache.pad])?;
        self.decode_step_from(&ids, &positions, &pad, cache, lora)
    }

    /// [`Decoder::decode_step`] for ids already on the device (`[rows]`, a previous step's
    /// choice from this model's logits, so within the vocabulary): no host round trip between
    /// steps. `bench --what decode_phases` measures what that saves.
    pub fn decode_step_on_device(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        if ids.size() != [cache.rows() as i64] {
            return Err(ModelError::invalid(
                "ids",
                format!("{:?} ids for a cache of {} rows", ids.size(), cache.rows()),
            ));
        }
        if let Some(batch) = lora {
            batch.check_rows(cache.rows() as i64)?;
        }
        let positions = self.next_positions(cache)?;
        let [positions, pad] = self.upload([&positions, &cache.pad])?;
        self.decode_step_from(ids, &positions, &pad, cache, lora)
    }

    /// Host vectors of one length on the device in one transfer (on a GPU each pageable copy is
    /// a synchronous round of the host): views of one tensor.
    fn upload<const N: usize>(&self, parts: [&[i64]; N]) -> Result<[Tensor; N]> {
        let len = parts.first().map_or(0, |p| p.len()) as i64;
        let packed = Tensor::from_slice(&parts.concat()).f_to_device(self.device)?;
        let mut views = Vec::with_capacity(N);
        for i in 0..N as i64 {
            views.push(packed.f_narrow(0, i * len, len)?);
        }
        views
            .try_into()
            .map_err(|_| ModelError::invalid("upload", "parts"))
    }

    /// Checks a decode step's host `ids` (one per row of `cache`, in the vocabulary) and
    /// `lora`'s rows; returns each row's next position (checked against the context).
    fn checked_step(
        &self,
        ids: &[i64],
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Vec<i64>> {
        if ids.len() != cache.rows() {
            return Err(ModelError::invalid(
                "ids",
                format!("{} tokens for a cache of {} rows", ids.len(), cache.rows()),
            ));
        }
        let positions = self.next_positions(cache)?;
        self.check_host_ids(ids, ids.len() as i64, lora)?;
        Ok(positions)
    }

    /// Each cache row's next position, checked against the model's context.
    fn next_positions(&self, cache: &KvCache) -> Result<Vec<i64>> {
        let positions = cache.next_positions();
        if positions
            .iter()
            .any(|&p| p >= self.config.max_position_embeddings)
        {
            return Err(ModelError::invalid(
                "max_tokens",
                format!(
                    "generation reached the model's context of {} tokens",
                    self.config.max_position_embeddings
                ),
            ));
        }
        Ok(positions)
    }

    /// The decode step of checked `ids` at `positions`, for rows padded by `pad` (each `[rows]`
    /// on the device). Never inlined: `scripts/decode_ops.sh` profiles each call as one step.
    #[inline(never)]
    fn decode_step_from(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        pad: &Tensor,
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let rows = cache.rows() as i64;
        let (cos, sin) = self.rope.cos_sin_at(positions, self.kind)?;
        let (mask, window) = self.step_mask(cache, pad)?;
        let step = Step {
            rows,
            rotation: Rope::rotation(&cos, &sin)?,
            mask,
            window,
            column: None,
        };
        cache.reserve(1)?;
        let hidden = self.run_step(ids, &step, cache, lora)?;
        cache.advance(1);
        Ok(hidden)
    }

    /// The layers of a decode `step` for `ids` (`[rows]` on the device), writing each layer's
    /// keys and values into `cache`: the final hidden state of each row.
    fn run_step(
        &self,
        ids: &Tensor,
        step: &Step,
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let mut x = Tensor::f_embedding(&self.embed, ids, -1, false, false)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = self.block_step(block, layer, &x, step, cache, lora)?;
        }
        self.final_norm.forward(&x)
    }

    /// The inputs of [`Decoder::decode_step_static`] for `ids` (one per cache row) as one host
    /// vector: the ids, each row's position, each row's first attended buffer column, then the
    /// column the step writes. Checks the ids and positions as [`Decoder::decode_step`] does;
    /// the cache must have room for the column ([`KvCache::reserve`]).
    pub fn static_step_inputs(
        &self,
        ids: &[i64],
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Vec<i64>> {
        let positions = self.checked_step(ids, cache, lora)?;
        let at = cache.next_column();
        if at >= cache.capacity() {
            return Err(ModelError::invalid(
                "cache",
                "no room reserved for the step",
            ));
        }
        let mut inputs = Vec::with_capacity(3 * ids.len() + 1);
        inputs.extend_from_slice(ids);
        inputs.extend(positions);
        inputs.extend(cache.first_columns());
        inputs.push(at);
        Ok(inputs)
    }

    /// A decode step whose kernels depend only on the cache's rows and capacity, not on its
    /// window: every device input is read from `inputs` (`[3 · rows + 1]` on the device, laid out
    /// by [`Decoder::static_step_inputs`]), attention runs over the whole buffers under a mask
    /// made from them, and the keys and values are written at the column they name. So one
    /// recording of it (a CUDA graph) serves every step until the batch or the buffers change.
    /// Returns the final hidden state of each row; the caller advances the cache by one.
    pub fn decode_step_static(
        &self,
        inputs: &Tensor,
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let rows = cache.rows() as i64;
        if inputs.size() != [3 * rows + 1] {
            return Err(ModelError::invalid(
                "inputs",
                format!("{:?} for a cache of {rows} rows", inputs.size()),
            ));
        }
        let ids = inputs.f_narrow(0, 0, rows)?;
        let positions = inputs.f_narrow(0, rows, rows)?;
        let first = inputs.f_narrow(0, 2 * rows, rows)?;
        let at = inputs.f_narrow(0, 3 * rows, 1)?;
        let (cos, sin) = self.rope.cos_sin_at(&positions, self.kind)?;
        let columns = cache.capacity();
        let column = Tensor::f_arange(columns, (Kind::Int64, self.device))?;
        let attend = column
            .f_ge_tensor(&first.f_view([rows, 1, 1])?)?
            .f_logical_and(&column.f_le_tensor(&at)?)?;
        let window = match self.windowed(&attend, &column, &at, columns)? {
            Some(w) => Some(self.step_mask_of(&w, rows, columns)?),
            None => None,
        };
        let step = Step {
            rows,
            rotation: Rope::rotation(&cos, &sin)?,
            mask: self.step_mask_of(&attend, rows, columns)?,
            window,
            column: Some(at),
        };
        self.run_step(&ids, &step, cache, lora)
    }

    /// The additive mask of a decode step ([`Step::mask`]) over `cache`'s window and the new
    /// column, for rows whose padding (columns before their first real one) is `pad`
    /// (`[rows]` on the device): made in storage of aligned rows (see [`Decoder::attend_at`]),
    /// one mask row per (row, key/value head), in four kernels; and the sliding layers' one
    /// when some layer slides.
    fn step_mask(&self, cache: &KvCache, pad: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let (rows, keys) = (cache.rows() as i64, cache.len() + 1);
        let key = Tensor::f_arange(keys, (Kind::Int64, self.device))?;
        let attend = key.f_ge_tensor(&pad.f_view([rows, 1, 1])?)?;
        // The query is the new column, the last.
        let query = key.f_narrow(0, keys - 1, 1)?;
        let window = match self.windowed(&attend, &key, &query, keys)? {
            Some(w) => Some(self.step_mask_of(&w, rows, keys)?),
            None => None,
        };
        Ok((self.step_mask_of(&attend, rows, keys)?, window))
    }

    /// A decode step's additive mask ([`Step::mask`]) from which keys each row attends to
    /// (`attend`, boolean `[rows, 1, keys]`): one mask row per (row, key/value head), in
    /// storage of aligned rows (see [`Decoder::attend_at`]).
    fn step_mask_of(&self, attend: &Tensor, rows: i64, keys: i64) -> Result<Tensor> {
        let kv = self.config.num_kv_heads;
        let mask = self.masked_all(&[rows * kv, 1, 1, keys])?;
        let _ = mask.f_view([rows, kv, keys])?.f_masked_fill_(attend, 0.0)?;
        Ok(mask)
    }

    /// Appends `t` tokens to each row of `cache` (the next chunk of a long prompt, or prompts
    /// whose first tokens' keys and values were copied in) and returns their final hidden
    /// states `[rows, t, hidden]`. Row `i`'s tokens are `ids[i·t + pads[i]..(i + 1)·t]`, left
    /// padded (any token id before); only a row with nothing cached may be padded, so every
    /// row's tokens stay contiguous at the end of its window. Each new token attends to its
    /// row's cached tokens and causally to its row's new ones.
    pub fn extend(
        &self,
        ids: &[i64],
        pads: &[i64],
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let rows = cache.rows();
        if rows == 0 || pads.len() != rows || ids.is_empty() || !ids.len().is_multiple_of(rows) {
            return Err(ModelError::invalid(
                "ids",
                format!(
                    "extending {rows} cache rows needs the same number of tokens for each and one pad per row, got {} tokens and {} pads",
                    ids.len(),
                    pads.len()
                ),
            ));
        }
        let t = (ids.len() / rows) as i64;
        let next = cache.next_positions();
        for (i, (&pad, &cached)) in pads.iter().zip(&next).enumerate() {
            if pad < 0 || pad >= t || (pad > 0 && cached > 0) {
                return Err(ModelError::invalid(
                    "pads",
                    format!("row {i}: pad {pad} of {t} tokens after {cached} cached ones"),
                ));
            }
        }
        self.check_host_ids(ids, rows as i64, lora)?;
        let longest = next.iter().zip(pads).map(|(n, p)| n + t - p).max();
        if let Some(longest) = longest.filter(|&l| l > self.config.max_position_embeddings) {
            return Err(ModelError::invalid(
                "input_ids",
                format!(
                    "sequence of {longest} tokens exceeds the model's context of {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let device = self.device;
        let rows = rows as i64;
        let input = Tensor::from_slice(ids)
            .f_view([rows, t])?
            .f_to_device(device)?;
        // Each row's positions continue its cached tokens (padding columns take 0).
        let positions: Vec<i64> = next
            .iter()
            .zip(pads)
            .flat_map(|(&n, &p)| (0..t).map(move |j| (n - p + j).max(0)))
            .collect();
        // [rows, 1, t, len + t]: keys from the row's first real column, causal; a padding
        // column attends to itself only.
        let len = cache.len();
        let first: Vec<i64> = next
            .iter()
            .zip(pads)
            .zip(&cache.pad)
            .map(|((&n, &p), &cp)| if n > 0 { cp } else { len + p })
            .collect();
        let positions = Tensor::from_slice(&positions)
            .f_to_device(device)?
            .f_view([rows, t])?;
        let first = Tensor::from_slice(&first).f_to_device(device)?;
        let key = Tensor::f_arange(len + t, (Kind::Int64, device))?.f_view([1, 1, len + t])?;
        let query =
            Tensor::f_arange_start(len, len + t, (Kind::Int64, device))?.f_view([1, t, 1])?;
        let mask = key
            .f_le_tensor(&query)?
            .f_logical_and(&key.f_ge_tensor(&first.f_view([rows, 1, 1])?)?)?
            .f_logical_or(&key.f_eq_tensor(&query)?)?;
        let window = self.windowed(&mask, &key, &query, len + t)?;
        let ctx = self.attend_at(&positions, mask.f_unsqueeze(1)?, window)?;
        let hidden = self.run_appending(&input, &ctx, lora, cache)?;
        cache.pad_rows(pads);
        Ok(hidden)
    }

    /// The checked ids of a pass whose rows all start at position 0 and attend causally, and
    /// its rotary tables.
    fn causal_from_start(
        &self,
        input_ids: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<(Tensor, Attend)> {
        let ids = self.checked_ids(input_ids, lora)?;
        let seq = ids.size()[1];
        let (cos, sin) = self.rope.cos_sin(0, seq, self.kind)?;
        // The sliding layers' mask, when some layer slides: causal, within the window.
        let window = match self.config.sliding_window {
            Some(window) if seq > window => {
                let column = Tensor::f_arange(seq, (Kind::Int64, self.device))?;
                let (key, query) = (column.f_view([1, seq])?, column.f_view([seq, 1])?);
                match self.windowed(&key.f_le_tensor(&query)?, &key, &query, seq)? {
                    Some(w) => Some(self.additive(&w.f_view([1, 1, seq, seq])?)?),
                    None => None,
                }
            }
            _ => None,
        };
        Ok((
            ids,
            Attend {
                cos: cos.f_unsqueeze(1)?,
                sin: sin.f_unsqueeze(1)?,
                mask: None,
                window,
            },
        ))
    }

    /// Rotary tables for `positions` (`[rows, seq]`, broadcast over heads) and the boolean
    /// `mask` (true = attend) as an additive one.
    ///
    /// Attention turns a boolean mask into an additive one on every call, and fused kernels copy
    /// a mask whose rows do not start at a multiple of [`MASK_ALIGN`] elements: made here, once
    /// per pass, in storage of padded rows, every layer reads it as it is.
    /// `window` is the sliding layers' boolean mask, shaped as `mask` but for its second
    /// dimension ([`Decoder::windowed`]).
    fn attend_at(
        &self,
        positions: &Tensor,
        mask: Tensor,
        window: Option<Tensor>,
    ) -> Result<Attend> {
        let (cos, sin) = self.rope.cos_sin_at(positions, self.kind)?;
        let window = match window {
            Some(w) => Some(self.additive(&w.f_unsqueeze(1)?)?),
            None => None,
        };
        Ok(Attend {
            cos: cos.f_unsqueeze(2)?,
            sin: sin.f_unsqueeze(2)?,
            mask: Some(self.additive(&mask)?),
            window,
        })
    }

    /// The boolean mask `mask` (true = attend) as an additive one in aligned storage
    /// ([`Decoder::masked_all`]). With attention sinks, the mask of a pass's
    /// [`attend_with_sinks`]: a leading column (the sink key) every query attends to.
    fn additive(&self, mask: &Tensor) -> Result<Tensor> {
        let mut size = mask.size();
        let sink = i64::from(self.config.attention_sinks);
        let keys = size.last().copied().unwrap_or(1);
        if let Some(last) = size.last_mut() {
            *last += sink;
        }
        let additive = self.masked_all(&size)?;
        let _ = additive
            .f_narrow(-1, sink, keys)?
            .f_masked_fill_(mask, 0.0)?;
        if sink == 1 {
            let _ = additive.f_narrow(-1, 0, 1)?.f_fill_(0.0)?;
        }
        Ok(additive)
    }

    /// `attend` (boolean, true = attend) narrowed to the sliding window: key column `key` of
    /// query column `query` (both broadcast against `attend`) stays when `query - key` is less
    /// than the window, as transformers' sliding-window mask has it. A row's columns hold its
    /// consecutive positions, so columns measure the distance. `None` when no layer slides, or
    /// when the window covers all `span` columns a query may reach back over (itself included):
    /// the sliding layers then attend as the others, with their mask (or causal fast path).
    fn windowed(
        &self,
        attend: &Tensor,
        key: &Tensor,
        query: &Tensor,
        span: i64,
    ) -> Result<Option<Tensor>> {
        let Some(window) = self.config.sliding_window.filter(|&w| span > w) else {
            return Ok(None);
        };
        let inside = key.f_gt_tensor(&query.f_sub_scalar(window)?)?;
        Ok(Some(attend.f_logical_and(&inside)?))
    }

    /// An additive mask of `size` that attends to nothing (every entry -inf), in storage whose
    /// rows are padded to [`MASK_ALIGN`] elements: the masks of [`Decoder::attend_at`] and
    /// [`Decoder::step_mask`] are filled into it.
    fn masked_all(&self, size: &[i64]) -> Result<Tensor> {
        let mut storage = size.to_vec();
        let keys = size.last().copied().unwrap_or(1);
        if let Some(last) = storage.last_mut() {
            *last = (keys + MASK_ALIGN - 1) / MASK_ALIGN * MASK_ALIGN;
        }
        let storage = Tensor::f_full(&storage, f64::NEG_INFINITY, (self.kind, self.device))?;
        Ok(storage.f_narrow(-1, 0, keys)?)
    }

    /// Runs `input` (`[rows, t]`) after `cache`'s window, writing its keys and values there:
    /// room is reserved first and the window advanced after.
    fn run_appending(
        &self,
        input: &Tensor,
        ctx: &Attend,
        lora: Option<&LoraBatch>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = input.size()[1];
        cache.reserve(t)?;
        let hidden = self.run_blocks(input, ctx, lora, Cache::Append(cache))?;
        cache.advance(t);
        Ok(hidden)
    }

    /// Checks token ids still on the host (a device-side range check would cost two syncs per
    /// token) and that `lora` covers `rows` rows.
    fn check_host_ids(&self, ids: &[i64], rows: i64, lora: Option<&LoraBatch>) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(ModelError::invalid(
                "input_ids",
                format!("token ids must lie in [0, {vocab}), found {bad}"),
            ));
        }
        match lora {
            Some(batch) => batch.check_rows(rows),
            None => Ok(()),
        }
    }

    fn checked_ids(&self, input_ids: &Tensor, lora: Option<&LoraBatch>) -> Result<Tensor> {
        let size = input_ids.size();
        if size.len() != 2 {
            return Err(ModelError::invalid(
                "input_ids",
                format!("expected [batch, seq], got {size:?}"),
            ));
        }
        let seq = size[1];
        if seq > self.config.max_position_embeddings {
            return Err(ModelError::invalid(
                "input_ids",
                format!(
                    "sequence of {seq} tokens exceeds the model's context of {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if let Some(batch) = lora {
            batch.check_rows(size[0])?;
        }
        let ids = input_ids.f_to_device(self.device)?;
        let vocab = self.config.vocab_size;
        if ids.numel() > 0 {
            let (min, max) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
            if min < 0 || max >= vocab {
                return Err(ModelError::invalid(
                    "input_ids",
                    format!("token ids must lie in [0, {vocab}), found range [{min}, {max}]"),
                ));
            }
        }
        Ok(ids)
    }

    /// Embeds `ids`, runs every block (filling or extending `cache` as asked) and applies the
    /// final norm.
    fn run_blocks(
        &self,
        ids: &Tensor,
        ctx: &Attend,
        lora: Option<&LoraBatch>,
        mut cache: Cache,
    ) -> Result<Tensor> {
        let mut x = Tensor::f_embedding(&self.embed, ids, -1, false, false)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let past = match &cache {
                Cache::Append(c) => Some((*c, i)),
                _ => None,
            };
            let (out, k, v) = self.block_forward(block, i, &x, ctx, past, lora)?;
            x = out;
            if let Cache::Fill(layers) = &mut cache {
                // Views of the fused projection's output: copies, so the cache does not keep
                // the queries alive.
                layers.push((k.f_contiguous()?, v.f_contiguous()?));
            }
        }
        self.final_norm.forward(&x)
    }

    /// Logits from final hidden states, with the unembedding LoRA when present.
    pub fn logits(&self, hidden: &Tensor, lora: Option<&LoraBatch>) -> Result<Tensor> {
        let base = hidden.f_matmul(&self.lm_head_weight().f_tr()?)?;
        match lora {
            Some(batch) => batch.add_delta(base, hidden, None, Target::Unembed),
            None => Ok(base),
        }
    }

    /// One block; returns its output and the layer's keys/values (past and new) for the cache.
    fn block_forward(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        ctx: &Attend,
        past: Option<(&KvCache, usize)>,
        lora: Option<&LoraBatch>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (b, t) = (x.size()[0], x.size()[1]);
        let h = block.input_norm.forward(x)?;
        let a = &block.attn;
        // `[b, t, n, head_dim]`, per-head normed where the family does (Qwen3).
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.f_view([b, t, n, c.head_dim])?;
            Ok(match norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            })
        };
        let [q, k, v] = a
            .qkv
            .forward(&h, lora, layer, [Target::Q, Target::K, Target::V])?;
        let q = heads(q, c.num_heads, &a.q_norm)?;
        let k = heads(k, c.num_kv_heads, &a.k_norm)?;
        let v = heads(v, c.num_kv_heads, &None)?;
        // The query and key heads side by side, rotated by one set of operations.
        let qk = Rope::apply(&Tensor::f_cat(&[q, k], 2)?, &ctx.cos, &ctx.sin)?;
        let q = qk.f_narrow(2, 0, c.num_heads)?.f_transpose(1, 2)?;
        let k = qk
            .f_narrow(2, c.num_heads, c.num_kv_heads)?
            .f_transpose(1, 2)?;
        let v = v.f_transpose(1, 2)?;
        let (k, v) = match past {
            Some((cache, layer)) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let grouped = c.num_kv_heads != c.num_heads;
        let group = c.num_heads / c.num_kv_heads;
        // Attention over `q` `[b, heads', queries', d]`, whose rows' sink logits (when the
        // family has them) are `sinks` (broadcast to `[b, heads', queries', 1]`).
        let sdpa = |q: &Tensor,
                    k: &Tensor,
                    v: &Tensor,
                    mask: Option<&Tensor>,
                    causal,
                    gqa,
                    sinks: Option<Tensor>|
         -> Result<Tensor> {
            match sinks {
                None => Ok(Tensor::f_scaled_dot_product_attention(
                    q, k, v, mask, 0.0, causal, None, gqa,
                )?),
                Some(sinks) => attend_with_sinks(q, k, v, mask, causal, gqa, &sinks),
            }
        };
        // Each query head's sink, for `q` with the heads in its second dimension.
        let by_head = a
            .sinks
            .as_ref()
            .map(|sinks| sinks.f_view([1, -1, 1, 1]))
            .transpose()?;
        let mask = match &ctx.window {
            Some(window) if c.sliding_layers[layer] => Some(window),
            _ => ctx.mask.as_ref(),
        };
        let attn = if grouped && (t == 1 || (past.is_some() && mask.is_some())) {
            // One token per row, or a prefill after a cache (masked): as in a decode step
            // ([`Decoder::block_step`]), the query heads sharing a key/value head become that
            // head's query positions (`group · t` of them, head-major),
            // so attention needs no expanded copy of the cache (no GQA) and fused kernels accept
            // the mask: one query per row broadcasts it over the group, several repeat it once
            // per head of the group. Causality is in the mask.
            let q = q.f_reshape([b, c.num_kv_heads, group * t, c.head_dim])?;
            let repeated = match mask {
                Some(mask) if t > 1 => Some(mask.f_repeat([1, 1, group, 1])?),
                _ => None,
            };
            // The query heads of a key/value head as its `group · t` query rows.
            let by_row = a
                .sinks
                .as_ref()
                .map(|sinks| -> Result<Tensor> {
                    Ok(sinks
                        .f_view([1, c.num_kv_heads, group, 1, 1])?
                        .f_expand([1, c.num_kv_heads, group, t, 1], false)?
                        .f_reshape([1, c.num_kv_heads, group * t, 1])?)
                })
                .transpose()?;
            sdpa(&q, &k, &v, repeated.as_ref().or(mask), false, false, by_row)?.f_reshape([
                b,
                c.num_heads,
                t,
                c.head_dim,
            ])?
        } else if let (Some(mask), true, true) = (mask, grouped, x.device().is_cuda()) {
            // A pass without a cache (a padded prefill, or a sliding layer of a training or
            // scoring pass longer than the window) with a mask and grouped key/value heads:
            // on a GPU only cuDNN's kernel takes that whole (the memory-efficient one has no
            // grouped heads, flash no mask), and cuDNN builds an execution plan for every new
            // batch shape (the binary asks libtorch to try it last: the cli's `main`). With the
            // key/value heads repeated (2q more elements per token and layer, within the memory
            // plan's margin), the memory-efficient kernel serves it.
            let (k, v) = (repeat_kv_heads(&k, group)?, repeat_kv_heads(&v, group)?);
            sdpa(&q, &k, &v, Some(mask), false, false, by_head)?
        } else {
            sdpa(&q, &k, &v, mask, mask.is_none(), grouped, by_head)?
        };
        let attn = attn
            .f_transpose(1, 2)?
            .f_reshape([b, t, c.num_heads * c.head_dim])?;
        Ok((Self::block_tail(block, layer, x, &attn, lora)?, k, v))
    }

    /// One block of a decode step: `x` `[rows, hidden]` (one token per row) to the block's
    /// output, the token's key (rotated) and value written into `cache`'s next column of
    /// `layer`. [`Decoder::block_forward`]'s arithmetic on matrices rather than `[rows, 1, ..]`
    /// tensors, so no reshapes between the operations (a decode step is bound by the number
    /// of operations its layers issue): queries rotated by one batched matmul, keys by another
    /// that writes them into the cache; the query heads of a key/value head attend as that
    /// head's query positions (no expanded copy of the cache, and fused kernels take the
    /// mask).
    fn block_step(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        step: &Step,
        cache: &KvCache,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (rows, d) = (step.rows, c.head_dim);
        let a = &block.attn;
        let h = block.input_norm.forward(x)?;
        let [q, k, v] = a
            .qkv
            .forward(&h, lora, layer, [Target::Q, Target::K, Target::V])?;
        // `[rows, heads, head_dim]`, per-head normed where the family does (Qwen3).
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let y = y.f_view([rows, n, d])?;
            Ok(match norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            })
        };
        // Attention batches over (row, key/value head) with one head each, the group's query
        // heads as its query positions: the output is `[rows, heads, head_dim]` in memory
        // whichever layout a fused kernel writes (`[batch, queries, heads, ..]` for
        // libtorch's memory-efficient one), so concatenating the heads is a view, not a copy.
        let kv = c.num_kv_heads;
        let q = heads(q, c.num_heads, &a.q_norm)?
            .f_bmm(&step.rotation)?
            .f_view([rows * kv, 1, c.num_heads / kv, d])?;
        let k = heads(k, kv, &a.k_norm)?;
        let v = heads(v, kv, &None)?;
        let (k, v) = match &step.column {
            None => cache.append_rotated(layer, &k, &v, &step.rotation)?,
            Some(at) => cache.write_rotated_at(layer, &k, &v, &step.rotation, at)?,
        };
        let (k, v) = (
            k.f_view([rows * kv, 1, -1, d])?,
            v.f_view([rows * kv, 1, -1, d])?,
        );
        let mask = match &step.window {
            Some(window) if c.sliding_layers[layer] => window,
            _ => &step.mask,
        };
        let attn = match &a.sinks {
            None => Tensor::f_scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(mask),
                0.0,
                false,
                None,
                false,
            )?,
            Some(sinks) => {
                // One query per row and head: the scores are `[rows · kv, 1, group, keys]`,
                // small enough to spell out (no copy of the cache with a sink key).
                let sinks = sinks
                    .f_view([1, kv, 1, c.num_heads / kv, 1])?
                    .f_expand([rows, kv, 1, c.num_heads / kv, 1], false)?
                    .f_reshape([rows * kv, 1, c.num_heads / kv, 1])?;
                let scores = q
                    .f_matmul(&k.f_transpose(-1, -2)?)?
                    .f_mul_scalar(1.0 / (d as f64).sqrt())?
                    .f_add(mask)?;
                let keys = scores.size()[3];
                Tensor::f_cat(&[scores, sinks], -1)?
                    .f_softmax(-1, q.kind())?
                    .f_narrow(-1, 0, keys)?
                    .f_matmul(&v)?
            }
        }
        .f_reshape([rows, c.num_heads * d])?;
        Self::block_tail(block, layer, x, &attn, lora)
    }

    /// The rest of a block after attention (`attn`, its heads concatenated, shaped as `x`):
    /// the output projection onto the residual `x`, then the MLP or the experts onto that.
    fn block_tail(
        block: &Block,
        layer: usize,
        x: &Tensor,
        attn: &Tensor,
        lora: Option<&LoraBatch>,
    ) -> Result<Tensor> {
        let a = &block.attn;
        let x = with_delta(a.o.forward_onto(attn, x)?, attn, lora, layer, Target::O)?;
        let h = block.post_attn_norm.forward(&x)?;
        let m = match &block.ffn {
            Ffn::Dense(m) => m,
            Ffn::Sparse(experts) => return experts.forward_onto(&h, &x, lora, layer),
        };
        let [gate, up] = m
            .gate_up
            .forward(&h, lora, layer, [Target::Gate, Target::Up])?;
        let gated = gate.f_silu()?.f_mul(&up)?;
        with_delta(
            m.down.forward_onto(&gated, &x)?,
            &gated,
            lora,
            layer,
            Target::Down,
        )
    }
}

/// Elements the head dimension grows by when attention carries sinks: the sink logit's column
/// and zeros to keep rows aligned for fused kernels.
pub(crate) const SINK_PAD: i64 = 8;

/// `scaled_dot_product_attention` of `q` `[b, hq, l, d]` over `k`, `v` `[b, hk, s, d]` with one
/// more key whose logit is `sinks` (broadcast to `[b, hq, l, 1]`, per query row) and whose
/// value is zero: GPT-OSS's sinks, which transformers appends as a column of the scores before
/// the softmax and drops after it. Done by fused attention on augmented operands, so the scores
/// are never materialised and gradients reach `q`, `k` and `v`: the head dimension grows by
/// [`SINK_PAD`], queries carry `sink / scale` in column `d`, real keys zero there, and the sink
/// key (a one there, zeros elsewhere, zero value) is prepended as key 0, which every query
/// attends to: an additive `mask` must carry its column (a leading zero column, as
/// [`Decoder::additive`] makes a pass's masks), and causal attention gains a leading query row
/// (dropped after) so that query `i` still reaches keys `0..=i + 1`.
fn attend_with_sinks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    gqa: bool,
    sinks: &Tensor,
) -> Result<Tensor> {
    let (b, hq, l, d) = q.size4()?;
    let (bk, hk, s, _) = k.size4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let opts = (q.kind(), q.device());
    let column = sinks
        .f_div_scalar(scale)?
        .f_to_kind(q.kind())?
        .f_expand([b, hq, l, 1], false)?;
    let mut q = Tensor::f_cat(
        &[
            q.shallow_clone(),
            column,
            Tensor::f_zeros([b, hq, l, SINK_PAD - 1], opts)?,
        ],
        -1,
    )?;
    if causal {
        q = Tensor::f_cat(&[Tensor::f_zeros([b, hq, 1, d + SINK_PAD], opts)?, q], 2)?;
    }
    // Keys or values `t` widened by zeros, after a first row `first` `[d + SINK_PAD]`.
    let widen = |t: &Tensor, first: &Tensor| -> Result<Tensor> {
        let padded = Tensor::f_cat(
            &[
                t.shallow_clone(),
                Tensor::f_zeros([bk, hk, s, SINK_PAD], opts)?,
            ],
            -1,
        )?;
        let first = first.f_expand([bk, hk, 1, d + SINK_PAD], false)?;
        Ok(Tensor::f_cat(&[first, padded], 2)?)
    };
    let sink_key = Tensor::f_zeros([d + SINK_PAD], opts)?;
    let _ = sink_key.f_narrow(0, d, 1)?.f_fill_(1.0)?;
    let k = widen(k, &sink_key)?;
    let v = widen(v, &Tensor::f_zeros([d + SINK_PAD], opts)?)?;
    let out =
        Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, Some(scale), gqa)?;
    let out = if causal { out.f_narrow(2, 1, l)? } else { out };
    Ok(out.f_narrow(-1, 0, d)?)
}

/// `[b, kv, t, d]` keys or values with each head repeated `group` times in place
/// (`[b, kv·group, t, d]`): query head `h` meets key/value head `h / group`, as
/// `scaled_dot_product_attention`'s `enable_gqa` pairs them.
fn repeat_kv_heads(x: &Tensor, group: i64) -> Result<Tensor> {
    let (b, kv, t, d) = x.size4()?;
    Ok(x.f_unsqueeze(2)?
        .f_expand([b, kv, group, t, d], false)?
        .f_reshape([b, kv * group, t, d])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_key_value_heads_attend_as_grouped_query_attention_does() {
        // 2 rows, 6 query heads over 2 key/value heads, 5 positions, a padding mask.
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(0);
        let q = Tensor::randn([2, 6, 5, 4], opts);
        let k = Tensor::randn([2, 2, 5, 4], opts);
        let v = Tensor::randn([2, 2, 5, 4], opts);
        let causal = Tensor::ones([5, 5], opts).triu(1).to_kind(Kind::Bool);
        let mask = Tensor::zeros([2, 1, 5, 5], opts).masked_fill(&causal, f64::NEG_INFINITY);
        // The second row's first key is padding (a large negative bias for every query).
        let pad = Tensor::from_slice(&[1f32, 0., 0., 0., 0.]).view([1, 1, 1, 5]) * -1e9;
        let mask = Tensor::cat(&[mask.narrow(0, 0, 1), mask.narrow(0, 1, 1) + pad], 0);
        let sdpa = |k: &Tensor, v: &Tensor, gqa: bool| {
            Tensor::scaled_dot_product_attention(&q, k, v, Some(&mask), 0.0, false, None, gqa)
        };
        let grouped = sdpa(&k, &v, true);
        let repeated = sdpa(
            &repeat_kv_heads(&k, 3).unwrap(),
            &repeat_kv_heads(&v, 3).unwrap(),
            false,
        );
        let diff = (grouped - repeated).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "max difference {diff}");
    }
}
