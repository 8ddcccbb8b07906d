//! `config.json` of a Hugging Face checkpoint, reduced to what the decoder needs.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;
use crate::moe::MAX_GROUPS;

/// Decoder families loraloom can run. They share one block layout and differ in biases,
/// q/k norms, defaults and (Qwen3-MoE) a mixture of experts in place of some blocks' MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM2).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM`: biases on q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on each head of q and k.
    Qwen3,
    /// `Qwen3MoeForCausalLM`: Qwen3's attention; a routed mixture of experts as the MLP of
    /// its sparse layers ([`MoeConfig`]).
    Qwen3Moe,
    /// `MixtralForCausalLM`: Mistral's attention; a routed mixture of experts as every layer's
    /// MLP.
    Mixtral,
    /// `GptOssForCausalLM`: biased attention with a learnt sink logit per head, alternating
    /// sliding and full layers, and biased experts with a clamped SwiGLU as every layer's MLP.
    GptOss,
}

impl Architecture {
    /// The `model_type` string of `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Mixtral => "mixtral",
            Architecture::GptOss => "gpt_oss",
        }
    }

    /// RMSNorm on each head of q and k (the Qwen3 families).
    pub fn qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }

    /// The blocks' and the final norm's weights stay in f32 whatever the model's type
    /// (transformers' `_keep_in_fp32_modules` for GPT-OSS).
    pub fn norms_in_f32(self) -> bool {
        self == Architecture::GptOss
    }
}

/// The mixture of experts of a Qwen3-MoE or Mixtral model: in each sparse layer a router picks
/// `experts_per_token` of `num_experts` gated MLPs per token and sums their outputs weighted by
/// the router's probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer.
    pub num_experts: i64,
    /// Experts each token is routed to (`k` of top-k).
    pub experts_per_token: i64,
    /// Width of one expert's hidden layer.
    pub expert_intermediate_size: i64,
    /// The `k` routing probabilities are renormalised to sum to one.
    pub norm_topk_prob: bool,
    /// Per layer: whether its MLP is the mixture (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// The routing weights multiply the experts' outputs in f32 (Mixtral), not rounded to the
    /// model's type first (Qwen3-MoE), as transformers does for each.
    pub weights_in_f32: bool,
    /// How the router turns its logits into the `k` experts' weights.
    pub routing: Routing,
    /// The experts' gated activation.
    pub activation: ExpertActivation,
}

/// How a router's logits become the chosen experts' weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over every expert in f32, then the top `k` (Qwen3-MoE, Mixtral).
    SoftmaxThenTopK,
    /// The top `k` logits, then a softmax over those in the model's type (GPT-OSS).
    TopKThenSoftmax,
}

/// The gated activation between an expert's gate/up projections and its down projection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `silu(gate) · up`.
    Silu,
    /// GPT-OSS's: `gate` clamped above at `limit`, `up` to `±limit`, then
    /// `(up + 1) · gate · sigmoid(alpha · gate)`.
    ClampedSwiglu {
        /// The sigmoid's gain (`swiglu_alpha`, 1.702).
        alpha: f64,
        /// The clamp (`swiglu_limit`, 7).
        limit: f64,
    },
}

/// How RoPE's frequencies are scaled for a context longer than the pre-training one.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "llama3"`.
    Llama3(Llama3RopeScaling),
    /// `rope_type: "yarn"`.
    Yarn(YarnRopeScaling),
}

/// YaRN (`rope_type: "yarn"`, Qwen3's and GPT-OSS's long-context setting): frequencies whose
/// wavelengths fit the pre-training context many times are kept, the longest are divided by
/// `factor`, those between blended along a linear ramp; cos and sin are multiplied by
/// `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnRopeScaling {
    /// Interpolation factor (`max_position_embeddings / original` when the config omits it).
    pub factor: f64,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: f64,
    /// Rotations within the pre-training context above which a frequency is kept (32).
    pub beta_fast: f64,
    /// Rotations below which it is interpolated (1).
    pub beta_slow: f64,
    /// Whether the ramp's ends are rounded outwards to whole dimensions (true).
    pub truncate: bool,
    /// What cos and sin are multiplied by: the config's `attention_factor`, else
    /// `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are given, else
    /// `0.1 · ln(factor) + 1`.
    pub attention_factor: f64,
}

/// Llama-3 style frequency scaling of RoPE (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall scale factor.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// Context length the model was pre-trained with.
    pub original_max_position_embeddings: f64,
}

/// Validated model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which decoder family.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: i64,
    /// Number of decoder blocks.
    pub num_layers: i64,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: i64,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: i64,
    /// The window the [`ModelConfig::sliding_layers`] attend within: a position attends to
    /// itself and the `sliding_window - 1` before it. `None` when no layer slides.
    pub sliding_window: Option<i64>,
    /// Per layer, whether it attends within the sliding window (all false without one).
    pub sliding_layers: Vec<bool>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    /// End-of-sequence tokens (sampling stops on them unless told otherwise).
    pub eos_token_ids: Vec<i64>,
    /// The mixture of experts, for a Qwen3-MoE, Mixtral or GPT-OSS model.
    pub moe: Option<MoeConfig>,
    /// Every attention head has a learnt sink logit (`self_attn.sinks`, GPT-OSS): a column the
    /// softmax normalises over with the keys, whose value is zero.
    pub attention_sinks: bool,
}

#[derive(Deserialize, Default)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    beta_fast: Option<f64>,
    beta_slow: Option<f64>,
    /// `None`: absent (true); `Some(None)`: `null`, false as transformers tests it.
    #[serde(default, deserialize_with = "present")]
    truncate: Option<Option<bool>>,
    partial_rotary_factor: Option<f64>,
    attention_factor: Option<f64>,
    mscale: Option<f64>,
    mscale_all_dim: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    vocab_size: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    max_position_embeddings: Option<i64>,
    /// Phi-3's place for the pretraining context; transformers prefers it to the rope dict's.
    original_max_position_embeddings: Option<f64>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    eos_token_id: Option<OneOrMany>,
    num_experts: Option<i64>,
    /// transformers 5's name for `num_experts` in the files it writes.
    num_local_experts: Option<i64>,
    num_experts_per_tok: Option<i64>,
    moe_intermediate_size: Option<i64>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<i64>,
    mlp_only_layers: Option<Vec<i64>>,
    /// `None`: absent; `Some(None)`: `null` (Mistral tells them apart).
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<i64>>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<i64>,
    layer_types: Option<Vec<String>>,
    swiglu_alpha: Option<f64>,
    swiglu_limit: Option<f64>,
    quantization_config: Option<serde_json::Value>,
}

/// A field that may be `null` as `Some(None)`, and absent (`#[serde(default)]`) as `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ModelError> {
    value.ok_or_else(|| ModelError::Config(format!("config.json: missing field `{field}`")))
}

fn positive(value: i64, field: &str) -> Result<i64, ModelError> {
    if value <= 0 {
        return Err(ModelError::Config(format!(
            "config.json: `{field}` must be positive, got {value}"
        )));
    }
    Ok(value)
}

impl ModelConfig {
    /// Checks that every token id is inside the vocabulary; names `field` and the position.
    pub fn check_tokens(&self, field: &str, ids: &[i64]) -> Result<(), ModelError> {
        let vocab = self.vocab_size;
        if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t < 0 || t >= vocab) {
            return Err(ModelError::invalid(
                field,
                format!("token id {t} at position {i} is outside the vocabulary [0, {vocab})"),
            ));
        }
        Ok(())
    }

    /// Reads and validates `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::MissingFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&text)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let mut raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let model_type = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let architecture = match model_type.as_str() {
            "llama" | "LlamaForCausalLM" => Architecture::Llama,
            "mistral" | "MistralForCausalLM" => Architecture::Mistral,
            "qwen2" | "Qwen2ForCausalLM" => Architecture::Qwen2,
            "qwen3" | "Qwen3ForCausalLM" => Architecture::Qwen3,
            "qwen3_moe" | "Qwen3MoeForCausalLM" => Architecture::Qwen3Moe,
            "mixtral" | "MixtralForCausalLM" => Architecture::Mixtral,
            "gpt_oss" | "GptOssForCausalLM" => Architecture::GptOss,
            other => {
                return Err(ModelError::UnsupportedArchitecture(if other.is_empty() {
                    "<no model_type>".to_string()
                } else {
                    other.to_string()
                }))
            }
        };
        let gpt_oss = architecture == Architecture::GptOss;
        let hidden_size = positive(required(raw.hidden_size, "hidden_size")?, "hidden_size")?;
        let num_heads = positive(
            required(raw.num_attention_heads, "num_attention_heads")?,
            "num_attention_heads",
        )?;
        // GPT-OSS's default is 8, as `GptOssConfig`'s.
        let num_kv_heads = positive(
            raw.num_key_value_heads
                .unwrap_or(if gpt_oss { 8 } else { num_heads }),
            "num_key_value_heads",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "config.json: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => positive(d, "head_dim")?,
            None if gpt_oss => 64,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(ModelError::Config(format!(
                        "config.json: hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads})"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::Config(format!(
                "config.json: head_dim must be even for RoPE, got {head_dim}"
            )));
        }
        let num_layers = positive(
            required(raw.num_hidden_layers, "num_hidden_layers")?,
            "num_hidden_layers",
        )?;
        let moe = match architecture {
            Architecture::Qwen3Moe | Architecture::Mixtral | Architecture::GptOss => {
                moe_config(architecture, &raw, hidden_size, num_layers)?
            }
            _ => None,
        };
        let (sliding_window, sliding_layers) = sliding_window(architecture, &raw, num_layers)?;
        // transformers 5 writes `rope_parameters`; older files use `rope_theta` + `rope_scaling`.
        // GPT-OSS without either: YaRN stretching 4096 positions 32 times, as transformers
        // defaults it.
        let rope = raw.rope_parameters.take().or(raw.rope_scaling.take());
        let rope = match rope {
            None if gpt_oss => Some(gpt_oss_rope()),
            rope => rope,
        };
        let partial = rope
            .as_ref()
            .and_then(|r| r.partial_rotary_factor)
            .or(raw.partial_rotary_factor);
        if let Some(factor) = partial.filter(|&f| f != 1.0) {
            return Err(ModelError::Config(format!(
                "config.json: partial_rotary_factor {factor} is not supported (RoPE over the whole head only)"
            )));
        }
        if let Some(method) = raw
            .quantization_config
            .as_ref()
            .map(|q| {
                q.get("quant_method")
                    .and_then(|m| m.as_str())
                    .unwrap_or("?")
            })
            .filter(|&m| !(gpt_oss && m == "mxfp4"))
        {
            return Err(ModelError::Config(format!(
                "config.json: quantization `{method}` is not supported (GPT-OSS's mxfp4 experts are)"
            )));
        }
        let max_position_embeddings =
            raw.max_position_embeddings
                .unwrap_or(if gpt_oss { 131_072 } else { 4096 });
        // The pretraining context of llama3 and YaRN scaling, where transformers looks for it.
        let original_context = |r: &RawRope| {
            raw.original_max_position_embeddings
                .or(r.original_max_position_embeddings)
                .unwrap_or(max_position_embeddings as f64)
        };
        let rope_theta = rope
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(if gpt_oss { 150_000.0 } else { 10_000.0 });
        let rope_scaling = match rope {
            None => None,
            Some(r) => match r.rope_type.clone().or(r.legacy_type.clone()).as_deref() {
                None | Some("default") => None,
                Some("llama3") => Some(RopeScaling::Llama3(Llama3RopeScaling {
                    factor: required(r.factor, "rope_scaling.factor")?,
                    low_freq_factor: required(r.low_freq_factor, "rope_scaling.low_freq_factor")?,
                    high_freq_factor: required(
                        r.high_freq_factor,
                        "rope_scaling.high_freq_factor",
                    )?,
                    original_max_position_embeddings: original_context(&r),
                })),
                Some("yarn") => Some(RopeScaling::Yarn(yarn(
                    &r,
                    original_context(&r),
                    max_position_embeddings,
                )?)),
                Some(other) => {
                    return Err(ModelError::Config(format!(
                        "config.json: rope type `{other}` is not supported (supported: default, llama3, yarn)"
                    )))
                }
            },
        };
        let attention_bias = raw.attention_bias.unwrap_or(gpt_oss);
        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => attention_bias,
        };
        let o_bias = match architecture {
            Architecture::Qwen2 => false,
            _ => attention_bias,
        };
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: positive(
                required(raw.intermediate_size, "intermediate_size")?,
                "intermediate_size",
            )?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: positive(required(raw.vocab_size, "vocab_size")?, "vocab_size")?,
            rms_norm_eps: raw
                .rms_norm_eps
                .unwrap_or(if gpt_oss { 1e-5 } else { 1e-6 }),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            sliding_window,
            sliding_layers,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            eos_token_ids: match raw.eos_token_id {
                None => Vec::new(),
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            moe,
            attention_sinks: gpt_oss,
        })
    }
}

/// GPT-OSS's RoPE when its config names none (transformers' `GptOssConfig` default).
fn gpt_oss_rope() -> RawRope {
    RawRope {
        rope_type: Some("yarn".into()),
        factor: Some(32.0),
        original_max_position_embeddings: Some(4096.0),
        beta_fast: Some(32.0),
        beta_slow: Some(1.0),
        truncate: Some(Some(false)),
        ..RawRope::default()
    }
}

/// YaRN's parameters as transformers reads them (`_compute_yarn_parameters`).
/// `original` is the pretraining context (from the rope dict, or where else transformers finds
/// it).
fn yarn(
    r: &RawRope,
    original: f64,
    max_position_embeddings: i64,
) -> Result<YarnRopeScaling, ModelError> {
    if original <= 0.0 {
        return Err(ModelError::Config(format!(
            "config.json: rope_scaling.original_max_position_embeddings must be positive, got {original}"
        )));
    }
    let factor = r
        .factor
        .unwrap_or(max_position_embeddings as f64 / original);
    if !(factor.is_finite() && factor > 0.0) {
        return Err(ModelError::Config(format!(
            "config.json: rope_scaling.factor must be positive, got {factor}"
        )));
    }
    let mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    // transformers tests these for truth: 0 counts as absent.
    let given = |v: Option<f64>| v.filter(|&x| x != 0.0);
    let attention_factor = match (r.attention_factor, given(r.mscale), given(r.mscale_all_dim)) {
        (Some(a), _, _) => a,
        (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
        _ => mscale(factor, 1.0),
    };
    Ok(YarnRopeScaling {
        factor,
        original_max_position_embeddings: original,
        beta_fast: given(r.beta_fast).unwrap_or(32.0),
        beta_slow: given(r.beta_slow).unwrap_or(1.0),
        truncate: r.truncate.is_none_or(|t| t.unwrap_or(false)),
        attention_factor,
    })
}

/// The sliding window and which layers attend within it, as transformers 5 reads the config:
/// - Mistral: `sliding_window` (4096 when absent, none when `null`), every layer;
/// - Mixtral: `sliding_window` when set, every layer;
/// - Qwen3-MoE: `sliding_window` (4096 when absent) when `use_sliding_window`, every layer;
/// - Qwen2 and Qwen3: the same window, for the layers `layer_types` names `sliding_attention`,
///   or without them the layers from `max_window_layers` (28 when absent) on;
/// - GPT-OSS: `sliding_window` (128 when absent), for the layers `layer_types` names, or
///   without them the even ones;
/// - Llama: none.
fn sliding_window(
    architecture: Architecture,
    raw: &RawConfig,
    num_layers: i64,
) -> Result<(Option<i64>, Vec<bool>), ModelError> {
    let layers = num_layers as usize;
    let qwen_window = || {
        if raw.use_sliding_window.unwrap_or(false) {
            raw.sliding_window.unwrap_or(Some(4096))
        } else {
            None
        }
    };
    let (window, sliding) = match architecture {
        Architecture::Llama => (None, vec![false; layers]),
        Architecture::Mistral => (raw.sliding_window.unwrap_or(Some(4096)), vec![true; layers]),
        Architecture::Mixtral => (raw.sliding_window.flatten(), vec![true; layers]),
        Architecture::Qwen3Moe => (qwen_window(), vec![true; layers]),
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let from = raw.max_window_layers.unwrap_or(28);
            (qwen_window(), layer_types(raw, num_layers, |l| l >= from)?)
        }
        // Even layers slide unless `layer_types` says otherwise.
        Architecture::GptOss => (
            raw.sliding_window.unwrap_or(Some(128)),
            layer_types(raw, num_layers, |l| l % 2 == 0)?,
        ),
    };
    match window {
        Some(w) if sliding.iter().any(|&s| s) => {
            Ok((Some(positive(w, "sliding_window")?), sliding))
        }
        _ => Ok((None, vec![false; layers])),
    }
}

/// Per layer, whether `layer_types` names it `sliding_attention`; without them, `default`'s
/// answer for its index.
fn layer_types(
    raw: &RawConfig,
    num_layers: i64,
    default: impl Fn(i64) -> bool,
) -> Result<Vec<bool>, ModelError> {
    match &raw.layer_types {
        Some(types) if types.len() as i64 != num_layers => Err(ModelError::Config(format!(
            "config.json: layer_types names {} layers, num_hidden_layers is {num_layers}",
            types.len()
        ))),
        Some(types) => Ok(types.iter().map(|t| t == "sliding_attention").collect()),
        None => Ok((0..num_layers).map(default).collect()),
    }
}

/// Elements a dimension of an expert's weights must be a multiple of: the grouped matmul that
/// runs every expert at once reads rows aligned to 16 bytes (8 bf16 elements).
const EXPERT_ALIGN: i64 = 8;

/// The mixture-of-experts fields of a Qwen3-MoE or Mixtral `config.json`; `None` for no experts
/// (every layer dense, as transformers reads Qwen3-MoE's `num_experts: 0`).
fn moe_config(
    architecture: Architecture,
    raw: &RawConfig,
    hidden_size: i64,
    num_layers: i64,
) -> Result<Option<MoeConfig>, ModelError> {
    let gpt_oss = architecture == Architecture::GptOss;
    // Mixtral's and GPT-OSS's experts are every layer's MLP, `intermediate_size` wide.
    let every_layer = matches!(architecture, Architecture::Mixtral | Architecture::GptOss);
    let num_experts = if gpt_oss {
        // `num_experts` is an alias transformers maps onto `num_local_experts`.
        raw.num_local_experts.or(raw.num_experts).unwrap_or(128)
    } else if every_layer {
        required(raw.num_local_experts, "num_local_experts")?
    } else {
        required(raw.num_experts.or(raw.num_local_experts), "num_experts")?
    };
    if num_experts == 0 && !every_layer {
        return Ok(None);
    }
    let num_experts = positive(num_experts, "num_experts")?;
    let per_token = match raw.num_experts_per_tok {
        None if gpt_oss => Some(4),
        given => given,
    };
    let experts_per_token = positive(
        required(per_token, "num_experts_per_tok")?,
        "num_experts_per_tok",
    )?;
    if num_experts > MAX_GROUPS {
        return Err(ModelError::Config(format!(
            "config.json: num_experts ({num_experts}) exceeds {MAX_GROUPS}, the most groups \
             libtorch's grouped matmul takes"
        )));
    }
    if experts_per_token > num_experts {
        return Err(ModelError::Config(format!(
            "config.json: num_experts_per_tok ({experts_per_token}) exceeds num_experts ({num_experts})"
        )));
    }
    let width_field = if every_layer {
        "intermediate_size"
    } else {
        "moe_intermediate_size"
    };
    let width = if every_layer {
        raw.intermediate_size
    } else {
        raw.moe_intermediate_size
    };
    let expert_intermediate_size = positive(required(width, width_field)?, width_field)?;
    for (field, value) in [
        ("hidden_size", hidden_size),
        (width_field, expert_intermediate_size),
    ] {
        if value % EXPERT_ALIGN != 0 {
            return Err(ModelError::Config(format!(
                "config.json: `{field}` of a mixture-of-experts model must be a multiple of {EXPERT_ALIGN}, got {value}"
            )));
        }
    }
    let step = positive(raw.decoder_sparse_step.unwrap_or(1), "decoder_sparse_step")?;
    let dense = raw.mlp_only_layers.clone().unwrap_or_default();
    // As transformers' Qwen3MoeDecoderLayer decides; every Mixtral layer is sparse.
    let sparse_layers = (0..num_layers)
        .map(|i| every_layer || (!dense.contains(&i) && (i + 1) % step == 0))
        .collect();
    let activation = if gpt_oss {
        let (alpha, limit) = (
            raw.swiglu_alpha.unwrap_or(1.702),
            raw.swiglu_limit.unwrap_or(7.0),
        );
        for (field, value) in [("swiglu_alpha", alpha), ("swiglu_limit", limit)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ModelError::Config(format!(
                    "config.json: `{field}` must be positive, got {value}"
                )));
            }
        }
        ExpertActivation::ClampedSwiglu { alpha, limit }
    } else {
        ExpertActivation::Silu
    };
    Ok(Some(MoeConfig {
        num_experts,
        experts_per_token,
        expert_intermediate_size,
        // Mixtral always renormalises the top k; GPT-OSS's softmax over them sums to one.
        norm_topk_prob: (architecture == Architecture::Mixtral)
            || raw.norm_topk_prob.unwrap_or(false),
        sparse_layers,
        weights_in_f32: architecture == Architecture::Mixtral,
        routing: if gpt_oss {
            Routing::TopKThenSoftmax
        } else {
            Routing::SoftmaxThenTopK
        },
        activation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#;

    #[test]
    fn parses_minimal_llama_with_defaults() {
        let c = ModelConfig::from_json(BASE).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_json(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = ModelConfig::from_json(r#"{"model_type":"qwen3","hidden_size":8}"#).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");
    }

    #[test]
    fn qwen3_moe_sparse_layers_follow_step_and_dense_list() {
        let text = BASE
            .replace("\"llama\"", "\"qwen3_moe\"")
            .replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":6")
            .replace(
                "\"vocab_size\":100",
                "\"vocab_size\":100,\"num_local_experts\":8,\"num_experts_per_tok\":2,\
                 \"moe_intermediate_size\":32,\"decoder_sparse_step\":2,\"mlp_only_layers\":[3]",
            );
        let c = ModelConfig::from_json(&text).unwrap();
        assert!(c.architecture.qk_norm());
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.experts_per_token), (8, 2));
        assert_eq!(
            moe.sparse_layers,
            [false, true, false, false, false, true],
            "odd layers sparse, layer 3 dense"
        );
        assert!(!moe.norm_topk_prob);

        let unaligned = text.replace(
            "\"moe_intermediate_size\":32",
            "\"moe_intermediate_size\":30",
        );
        let err = ModelConfig::from_json(&unaligned).unwrap_err();
        assert!(err.to_string().contains("moe_intermediate_size"), "{err}");
        let dense = text.replace("\"num_local_experts\":8", "\"num_local_experts\":0");
        assert_eq!(ModelConfig::from_json(&dense).unwrap().moe, None);
        let too_many = text.replace("\"num_experts_per_tok\":2", "\"num_experts_per_tok\":9");
        let err = ModelConfig::from_json(&too_many).unwrap_err();
        assert!(err.to_string().contains("num_experts_per_tok"), "{err}");
        let grouped = text.replace("\"num_local_experts\":8", "\"num_local_experts\":1024");
        let err = ModelConfig::from_json(&grouped).unwrap_err();
        assert!(err.to_string().contains("num_experts (1024)"), "{err}");
    }

    #[test]
    fn sliding_windows_are_read_as_transformers_reads_them() {
        let config = |model_type: &str, extra: &str| {
            let text = BASE
                .replace("\"llama\"", &format!("\"{model_type}\""))
                .replace(
                    "\"vocab_size\":100",
                    &format!("\"vocab_size\":100,\"max_position_embeddings\":32768{extra}"),
                );
            ModelConfig::from_json(&text)
        };
        let window = |model_type: &str, extra: &str| {
            let c = config(model_type, extra).unwrap();
            assert_eq!(c.max_position_embeddings, 32768, "the window caps nothing");
            (c.sliding_window, c.sliding_layers)
        };
        let (all, none) = (vec![true, true], vec![false, false]);
        // Mistral-7B-v0.1: 4096; later Mistrals: null; a file without the field: 4096.
        assert_eq!(
            window("mistral", ",\"sliding_window\":4096"),
            (Some(4096), all.clone())
        );
        assert_eq!(
            window("mistral", ",\"sliding_window\":null"),
            (None, none.clone())
        );
        assert_eq!(window("mistral", ""), (Some(4096), all.clone()));
        // Qwen2 and Qwen3 carry a window they use only when told to, from `max_window_layers`
        // on, or where `layer_types` say.
        assert_eq!(
            window("qwen2", ",\"sliding_window\":1024"),
            (None, none.clone())
        );
        assert_eq!(
            window(
                "qwen3",
                ",\"sliding_window\":1024,\"use_sliding_window\":true,\"max_window_layers\":1"
            ),
            (Some(1024), vec![false, true])
        );
        assert_eq!(
            window("qwen2", ",\"use_sliding_window\":true,\"layer_types\":[\"sliding_attention\",\"full_attention\"]"),
            (Some(4096), vec![true, false])
        );
        // transformers 5 writes the layer types of a Qwen without a window: none slides.
        assert_eq!(
            window(
                "qwen2",
                ",\"sliding_window\":null,\"layer_types\":[\"full_attention\",\"full_attention\"]"
            ),
            (None, none.clone())
        );
        assert_eq!(window("llama", ",\"sliding_window\":16"), (None, none));
        let err = config("qwen2", ",\"layer_types\":[\"full_attention\"]").unwrap_err();
        assert!(err.to_string().contains("layer_types"), "{err}");
        let err = config("mistral", ",\"sliding_window\":0").unwrap_err();
        assert!(err.to_string().contains("sliding_window"), "{err}");
    }

    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let text = BASE.replace(
            "\"vocab_size\":100",
            "\"vocab_size\":100,\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\
             \"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\
             \"original_max_position_embeddings\":8192}",
        );
        let c = ModelConfig::from_json(&text).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3(s)) if s.factor == 8.0));
    }

    #[test]
    fn yarn_parameters_default_as_transformers_defaults_them() {
        let yarn = |params: &str| {
            let text = BASE.replace(
                "\"vocab_size\":100",
                &format!("\"vocab_size\":100,\"max_position_embeddings\":131072,\"rope_scaling\":{{\"rope_type\":\"yarn\"{params}}}"),
            );
            match ModelConfig::from_json(&text).unwrap().rope_scaling {
                Some(RopeScaling::Yarn(y)) => y,
                other => panic!("{other:?}"),
            }
        };
        // Qwen3's long-context setting.
        let y = yarn(",\"factor\":4.0,\"original_max_position_embeddings\":32768");
        assert_eq!((y.beta_fast, y.beta_slow, y.truncate), (32.0, 1.0, true));
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // No factor: the context over the original one.
        let y = yarn(",\"original_max_position_embeddings\":32768");
        assert_eq!(y.factor, 4.0);
        // DeepSeek's mscale pair, and an explicit factor winning over both.
        let y = yarn(",\"factor\":40,\"original_max_position_embeddings\":4096,\"mscale\":1.0,\"mscale_all_dim\":0.707");
        let m = |k: f64| 0.1 * k * 40f64.ln() + 1.0;
        assert!((y.attention_factor - m(1.0) / m(0.707)).abs() < 1e-12);
        let y = yarn(",\"factor\":2,\"original_max_position_embeddings\":4096,\"attention_factor\":1.5,\"truncate\":false");
        assert_eq!((y.attention_factor, y.truncate), (1.5, false));
        // `null` is false to transformers (absent is true).
        assert!(!yarn(",\"factor\":2,\"truncate\":null").truncate);
        // Without an original context it is the model's; a top-level one wins over the dict's.
        let y = yarn(",\"factor\":2");
        assert_eq!(y.original_max_position_embeddings, 131072.0);
        let text = BASE.replace(
            "\"vocab_size\":100",
            "\"vocab_size\":100,\"original_max_position_embeddings\":2048,\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2,\"original_max_position_embeddings\":4096}",
        );
        match ModelConfig::from_json(&text).unwrap().rope_scaling {
            Some(RopeScaling::Yarn(y)) => assert_eq!(y.original_max_position_embeddings, 2048.0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gpt_oss_defaults_are_transformers_defaults() {
        // gpt-oss-20b's config.json, less the fields transformers defaults as written here.
        let text = r#"{"model_type":"gpt_oss","hidden_size":2880,"intermediate_size":2880,
            "num_hidden_layers":4,"num_attention_heads":64,"num_experts":32,"vocab_size":201088,
            "quantization_config":{"quant_method":"mxfp4"}}"#;
        let c = ModelConfig::from_json(text).unwrap();
        assert_eq!(c.architecture, Architecture::GptOss);
        assert_eq!((c.head_dim, c.rms_norm_eps), (64, 1e-5));
        assert_eq!(c.num_kv_heads, 8);
        assert!(c.attention_sinks && c.qkv_bias && c.o_bias && !c.mlp_bias);
        assert_eq!(c.sliding_window, Some(128));
        assert_eq!(c.sliding_layers, [true, false, true, false]);
        assert_eq!(
            (c.rope_theta, c.max_position_embeddings),
            (150_000.0, 131_072)
        );
        match c.rope_scaling {
            Some(RopeScaling::Yarn(y)) => {
                assert_eq!(
                    (y.factor, y.original_max_position_embeddings),
                    (32.0, 4096.0)
                );
                assert!(!y.truncate);
            }
            other => panic!("{other:?}"),
        }
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.experts_per_token), (32, 4));
        assert_eq!(moe.expert_intermediate_size, 2880);
        assert_eq!(moe.sparse_layers, [true; 4]);
        assert_eq!(moe.routing, Routing::TopKThenSoftmax);
        assert_eq!(
            moe.activation,
            ExpertActivation::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0
            }
        );
        assert!(!moe.norm_topk_prob && !moe.weights_in_f32);
        // Other quantizations, and mxfp4 outside GPT-OSS, are refused by name.
        let gptq = text.replace("mxfp4", "gptq");
        let err = ModelConfig::from_json(&gptq).unwrap_err();
        assert!(err.to_string().contains("gptq"), "{err}");
        let llama = BASE.replace(
            "\"vocab_size\":100",
            "\"vocab_size\":100,\"quantization_config\":{\"quant_method\":\"mxfp4\"}",
        );
        assert!(ModelConfig::from_json(&llama).is_err());
        let limit = text.replace(
            "\"num_experts\":32",
            "\"num_experts\":32,\"swiglu_limit\":-1",
        );
        let err = ModelConfig::from_json(&limit).unwrap_err();
        assert!(err.to_string().contains("swiglu_limit"), "{err}");
    }

    #[test]
    fn partial_rotary_embeddings_are_refused() {
        for place in [
            "\"partial_rotary_factor\":0.5",
            "\"rope_parameters\":{\"rope_type\":\"default\",\"partial_rotary_factor\":0.5}",
        ] {
            let text = BASE.replace("\"vocab_size\":100", &format!("\"vocab_size\":100,{place}"));
            let err = ModelConfig::from_json(&text).unwrap_err();
            assert!(err.to_string().contains("partial_rotary_factor"), "{err}");
        }
        let text = BASE.replace(
            "\"vocab_size\":100",
            "\"vocab_size\":100,\"partial_rotary_factor\":1.0",
        );
        assert!(ModelConfig::from_json(&text).is_ok());
    }
}
