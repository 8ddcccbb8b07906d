//! The Tinker loss functions over per-token target log-probabilities.
//!
//! Every loss is a plain sum over tokens (`loss:sum`), never a mean: `weights` and `advantages`
//! carry whatever normalisation the user wants. With `lp` the model's log-probability of the
//! target token, `q` the sampler's (`logprobs` input) and `r = exp(lp - q)`:
//!
//! | loss | per-token term |
//! |---|---|
//! | `cross_entropy` | `-w · lp` |
//! | `importance_sampling` | `-w · r · A` |
//! | `ppo` | `-w · min(r · A, clamp(r, lo, hi) · A)` |
//! | `cispo` | `-w · sg(clamp(r, lo, hi)) · lp · A` |
//! | `dro` | `-w · (lp · A - β/2 · (lp - q)²)` |
//! | `gspo` | `-w · min(s_t · A, clamp(s_t, lo, hi) · A)` |
//! | `stable_reinforce` | `-w · m · (sg(min(r, hi)) · lp · A - κ · (ρ - 1 - log ρ))` |
//!
//! GSPO is the token-level variant Tinker documents: the sequence ratio
//! `s = exp(mean over the tokens `sequence_ratio_mask` marks of sg(lp) - q)`, and each token
//! carries `s_t = sg(s) · exp(lp - sg(lp))` (the sequence ratio's value, its own token's
//! gradient); the sequence ratio's log is bounded by [`KL_LOG_RATIO_BOUND`] (`s` within
//! e^±20), so it stays finite in f32. `dro`'s penalty applies at every position, as Tinker's
//! documented code does (a prompt token sent with advantage 0 and sampler logprob 0 still pays
//! `β/2 · lp²`).
//!
//! `stable_reinforce` is loraloom's own objective: Thinking Machines describe the loss (a
//! REINFORCE variant that stays stable off-policy, fed by what the sampler recorded) but have not
//! published its formula. Here it is REINFORCE with truncated importance weights (the ratio capped
//! at `hi`, default 2, and never differentiated) plus, with `kl_coeff` κ > 0, the k3 estimate of
//! KL(sampler ‖ policy), whose gradient `(ρ - 1)·∇lp` pulls the policy back toward the sampler
//! (`ρ` is `r` with its log bounded by [`KL_LOG_RATIO_BOUND`], so the term stays finite).
//! `m` (`recorded`) marks the targets that are sampled tokens; `q` there is the log-probability
//! each was drawn with (after temperature, top-k and top-p), recorded by the server when it
//! sampled them, never a value the client sends.
//!
//! `w` (`weights`) is optional for every loss and defaults to 1 (as the SDK's own `forward`
//! example sends only `target_tokens`), so the documented formulas hold exactly when it is
//! absent; given, it masks and scales tokens.

use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// A loss function with its configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LossFn {
    /// Weighted negative log-likelihood.
    CrossEntropy,
    /// Importance-weighted policy gradient.
    ImportanceSampling,
    /// PPO's clipped objective; `clip_low`/`clip_high` bound the ratio itself.
    Ppo {
        /// Lower ratio bound (default 0.8).
        clip_low: f64,
        /// Upper ratio bound (default 1.2).
        clip_high: f64,
    },
    /// CISPO: clipped, stop-gradient ratio times the log-probability.
    Cispo {
        /// Lower ratio bound (default 0.0).
        clip_low: f64,
        /// Upper ratio bound (default 4.0).
        clip_high: f64,
    },
    /// DRO: advantage-weighted log-probability with a quadratic penalty.
    Dro {
        /// Penalty strength (default 0.1).
        beta: f64,
    },
    /// GSPO (token-level): PPO's clipped objective on the sequence's ratio.
    Gspo {
        /// Lower ratio bound (default 0.8, as `ppo`'s).
        clip_low: f64,
        /// Upper ratio bound (default 1.2).
        clip_high: f64,
    },
    /// StableReinforce (loraloom's objective, see the module docs): REINFORCE over the sampled
    /// tokens with truncated importance weights against the recorded sampler log-probabilities.
    StableReinforce {
        /// Cap of the importance weight (default 2.0).
        clip_high: f64,
        /// Strength of the KL(sampler ‖ policy) penalty (default 0).
        kl_coeff: f64,
    },
}

impl LossFn {
    /// The loss by its wire name with `config` values (`clip_low_threshold`,
    /// `clip_high_threshold`, `beta`); unknown names and bad values name the field.
    pub fn from_name(name: &str, config: &[(String, f64)]) -> Result<Self> {
        let get = |key: &str, default: f64| -> Result<f64> {
            match config.iter().find(|(k, _)| k == key) {
                None => Ok(default),
                Some((_, v)) if v.is_finite() => Ok(*v),
                Some((_, v)) => Err(ModelError::invalid(
                    format!("loss_fn_config.{key}"),
                    format!("must be finite, got {v}"),
                )),
            }
        };
        let known = |keys: &[&str]| -> Result<()> {
            match config.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
                Some((k, _)) => Err(ModelError::invalid(
                    format!("loss_fn_config.{k}"),
                    format!("not a parameter of loss `{name}` (accepted: {keys:?})"),
                )),
                None => Ok(()),
            }
        };
        let clip = |lo_default: f64, hi_default: f64| -> Result<(f64, f64)> {
            known(&["clip_low_threshold", "clip_high_threshold"])?;
            let lo = get("clip_low_threshold", lo_default)?;
            let hi = get("clip_high_threshold", hi_default)?;
            if lo < 0.0 || hi < lo {
                return Err(ModelError::invalid(
                    "loss_fn_config.clip_low_threshold",
                    format!(
                        "need 0 <= clip_low_threshold <= clip_high_threshold, got {lo} and {hi}"
                    ),
                ));
            }
            Ok((lo, hi))
        };
        Ok(match name {
            "cross_entropy" => {
                known(&[])?;
                LossFn::CrossEntropy
            }
            "importance_sampling" => {
                known(&[])?;
                LossFn::ImportanceSampling
            }
            "ppo" => {
                let (clip_low, clip_high) = clip(0.8, 1.2)?;
                LossFn::Ppo {
                    clip_low,
                    clip_high,
                }
            }
            "cispo" => {
                let (clip_low, clip_high) = clip(0.0, 4.0)?;
                LossFn::Cispo {
                    clip_low,
                    clip_high,
                }
            }
            "gspo" => {
                let (clip_low, clip_high) = clip(0.8, 1.2)?;
                LossFn::Gspo {
                    clip_low,
                    clip_high,
                }
            }
            "dro" => {
                known(&["beta"])?;
                LossFn::Dro {
                    beta: get("beta", 0.1)?,
                }
            }
            "stable_reinforce" => {
                known(&["clip_high_threshold", "kl_coeff"])?;
                let clip_high = get("clip_high_threshold", 2.0)?;
                if clip_high <= 0.0 {
                    return Err(ModelError::invalid(
                        "loss_fn_config.clip_high_threshold",
                        format!("must be positive, got {clip_high}"),
                    ));
                }
                let kl_coeff = get("kl_coeff", 0.0)?;
                if kl_coeff < 0.0 {
                    return Err(ModelError::invalid(
                        "loss_fn_config.kl_coeff",
                        format!("must be >= 0, got {kl_coeff}"),
                    ));
                }
                LossFn::StableReinforce {
                    clip_high,
                    kl_coeff,
                }
            }
            other => {
                return Err(ModelError::invalid(
                    "loss_fn",
                    format!(
                        "unknown loss `{other}` (supported: cross_entropy, importance_sampling, ppo, cispo, dro, gspo, stable_reinforce)"
                    ),
                ))
            }
        })
    }

    /// Whether the loss reads the sampler's `logprobs` and `advantages`.
    pub fn needs_policy_inputs(&self) -> bool {
        !matches!(self, LossFn::CrossEntropy)
    }

    /// Whether a token's loss depends on the whole sequence (GSPO's sequence ratio), so the
    /// sequence's log ratio is computed before its losses.
    pub fn needs_sequence_ratio(&self) -> bool {
        matches!(self, LossFn::Gspo { .. })
    }

    /// Whether the loss trains only on tokens whose sampling the server recorded
    /// (`stable_reinforce`): the server fills `logprobs` and `recorded` from the datum's
    /// provenance spans.
    pub fn needs_recorded_samples(&self) -> bool {
        matches!(self, LossFn::StableReinforce { .. })
    }
}

/// GSPO's sequence log ratio: the mean of `lp - q` over the positions `mask` marks (0 when it
/// marks none), from every position's `lp` (detached) and the datum's inputs.
pub fn sequence_log_ratio(lp: &[f32], inputs: &LossInputs) -> f64 {
    let (Some(q), Some(mask)) = (&inputs.logprobs, &inputs.sequence_ratio_mask) else {
        return 0.0;
    };
    let (sum, count) = lp
        .iter()
        .zip(q)
        .zip(mask)
        .filter(|(_, &m)| m != 0.0)
        .fold((0.0f64, 0usize), |(s, n), ((&l, &q), _)| {
            (s + f64::from(l) - f64::from(q), n + 1)
        });
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// Per-token inputs of one datum besides the model input, validated to one length.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossInputs {
    /// Token each position should predict.
    pub target_tokens: Vec<i64>,
    /// Per-token weights (default 1).
    pub weights: Option<Vec<f32>>,
    /// Sampler log-probabilities of the targets (RL losses).
    pub logprobs: Option<Vec<f32>>,
    /// Per-token advantages (RL losses).
    pub advantages: Option<Vec<f32>>,
    /// The tokens GSPO's sequence ratio averages over (nonzero: included).
    pub sequence_ratio_mask: Option<Vec<f32>>,
    /// 1 where the target is a sampled token the server recorded (`stable_reinforce`), 0
    /// elsewhere; filled by the server from the datum's provenance, never read from the wire.
    pub recorded: Option<Vec<f32>>,
    /// `Some(K)` when `target_tokens` (and `weights`, if given) are `[N, K]`, row after row:
    /// K targets per position (top-K distillation), each position's loss
    /// `-Σ_k w[n, k] · lp(t[n, k])`. `cross_entropy` only; `None` for one target per position.
    pub targets_per_position: Option<usize>,
}

/// Most targets one position may carry in a 2-D `[N, K]` `target_tokens`.
pub const MAX_TARGETS_PER_POSITION: usize = 1024;

/// Names value `i` of a per-position input: `7`, or `[7, 3]` when it has `per` values a position.
fn position_name(i: usize, per: usize) -> String {
    if per == 1 {
        i.to_string()
    } else {
        format!("[{}, {}]", i / per, i % per)
    }
}

impl LossInputs {
    /// Targets alone (`per`: K of `[N, K]` targets), every other input absent.
    pub fn targets(target_tokens: Vec<i64>, per: Option<usize>) -> Self {
        LossInputs {
            target_tokens,
            weights: None,
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: per,
        }
    }

    /// Targets per position: K of a 2-D `[N, K]` `target_tokens`, 1 otherwise.
    pub fn width(&self) -> usize {
        self.targets_per_position.unwrap_or(1)
    }

    /// Checks lengths against `len` (the model input's length), finiteness, and that the loss
    /// has what it needs.
    pub fn validate(&self, loss: &LossFn, len: usize, vocab: i64) -> Result<()> {
        let width = self.width();
        if let Some(k) = self.targets_per_position {
            // More targets than the vocabulary holds would only repeat ids, and would make the
            // loss chunks' per-target tensors outgrow the logits the memory plan counts.
            let most = MAX_TARGETS_PER_POSITION.min(usize::try_from(vocab).unwrap_or(usize::MAX));
            if !(1..=most).contains(&k) {
                return Err(ModelError::invalid(
                    "loss_fn_inputs.target_tokens",
                    format!(
                        "has {k} targets per position; 1 to {most} are accepted (at most {MAX_TARGETS_PER_POSITION}, and no more than the vocabulary)"
                    ),
                ));
            }
            if *loss != LossFn::CrossEntropy {
                return Err(ModelError::invalid(
                    "loss_fn_inputs.target_tokens",
                    "is 2-D [N, K] (K targets per position), which only loss cross_entropy accepts; send one target per position",
                ));
            }
        }
        let shape = |per: usize| {
            if per == 1 {
                format!("model_input has {len}")
            } else {
                format!("{len} positions x {per} are needed")
            }
        };
        if self.target_tokens.len() != len * width {
            return Err(ModelError::invalid(
                "loss_fn_inputs.target_tokens",
                format!(
                    "has {} tokens but {}",
                    self.target_tokens.len(),
                    shape(width)
                ),
            ));
        }
        if let Some((i, t)) = self
            .target_tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= vocab)
        {
            return Err(ModelError::invalid(
                "loss_fn_inputs.target_tokens",
                format!(
                    "token id {t} at position {} is outside the vocabulary [0, {vocab})",
                    position_name(i, width)
                ),
            ));
        }
        let check = |name: &str, values: &Option<Vec<f32>>, required: bool, per: usize| {
            let field = format!("loss_fn_inputs.{name}");
            match values {
                None if required => Err(ModelError::invalid(field, "is required by this loss")),
                None => Ok(()),
                Some(v) if v.len() != len * per => Err(ModelError::invalid(
                    field,
                    format!("has {} values but {}", v.len(), shape(per)),
                )),
                Some(v) => match v.iter().position(|x| !x.is_finite()) {
                    Some(i) => Err(ModelError::invalid(
                        field,
                        format!("value at position {} is not finite", position_name(i, per)),
                    )),
                    None => Ok(()),
                },
            }
        };
        let policy = loss.needs_policy_inputs();
        check("weights", &self.weights, false, width)?;
        check("logprobs", &self.logprobs, policy, 1)?;
        check("advantages", &self.advantages, policy, 1)?;
        check(
            "sequence_ratio_mask",
            &self.sequence_ratio_mask,
            loss.needs_sequence_ratio(),
            1,
        )?;
        if loss.needs_recorded_samples() && self.recorded.is_none() {
            return Err(ModelError::invalid(
                "loss_fn_input_spans",
                "stable_reinforce needs provenance spans naming the sampled sequences (sample with record_stability_info=True, then Datum.with_provenance)",
            ));
        }
        check("recorded", &self.recorded, false, 1)?;
        Ok(())
    }
}

/// `values` as a tensor of `like`'s shape, device and element type.
fn float_tensor(values: &[f32], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_slice(values)
        .f_to_device(like.device())?
        .f_to_kind(like.kind())?
        .f_view(like.size().as_slice())?)
}

/// Log-probabilities of `targets` under `logits` `[len, vocab]`, computed in f32: `[len]` for
/// one target per position (`per` 1), else `[len, per]` for `targets` holding `per` a position.
pub fn target_logprobs(logits: &Tensor, targets: &[i64], per: usize) -> Result<Tensor> {
    let logits = logits.f_to_kind(Kind::Float)?;
    let idx = Tensor::from_slice(targets)
        .f_to_device(logits.device())?
        .f_view([-1, per as i64])?;
    let picked = logits.f_gather(-1, &idx, false)?;
    let norm = logits.f_logsumexp(&[-1i64][..], true)?;
    let lp = picked.f_sub(&norm)?;
    Ok(if per == 1 { lp.f_squeeze_dim(-1)? } else { lp })
}

/// Bound of the log ratios that are exponentiated whole: `stable_reinforce`'s inside its KL
/// term and GSPO's sequence ratio. e^20 ≈ 5·10⁸ keeps the terms and their gradients finite in
/// f32 (beyond it a clamped term's gradient is 0, as a clamp's is).
pub const KL_LOG_RATIO_BOUND: f64 = 20.0;

/// The per-token loss of datums (or chunks of them) given their target log-probabilities `lp`:
/// `[len]` for one datum, or `[rows, len]` for rows of equal (padded) length, `inputs` holding
/// their values row after row. `sequence_log_ratios` holds each row's whole-datum
/// [`sequence_log_ratio`] (read by GSPO only).
pub fn elementwise_loss(
    loss: &LossFn,
    lp: &Tensor,
    inputs: &LossInputs,
    sequence_log_ratios: &[f64],
) -> Result<Tensor> {
    let weights = match &inputs.weights {
        Some(w) => Some(float_tensor(w, lp)?),
        None => None,
    };
    let policy = |v: &Option<Vec<f32>>, name: &str| -> Result<Tensor> {
        let v = v.as_ref().ok_or_else(|| {
            ModelError::invalid(format!("loss_fn_inputs.{name}"), "is required by this loss")
        })?;
        float_tensor(v, lp)
    };
    let objective = match *loss {
        LossFn::CrossEntropy => lp.shallow_clone(),
        _ => {
            let q = policy(&inputs.logprobs, "logprobs")?;
            let adv = policy(&inputs.advantages, "advantages")?;
            let ratio = lp.f_sub(&q)?.f_exp()?;
            match *loss {
                LossFn::ImportanceSampling => ratio.f_mul(&adv)?,
                LossFn::Ppo {
                    clip_low,
                    clip_high,
                } => {
                    let unclipped = ratio.f_mul(&adv)?;
                    let clipped = ratio.f_clamp(clip_low, clip_high)?.f_mul(&adv)?;
                    unclipped.f_minimum(&clipped)?
                }
                LossFn::Cispo {
                    clip_low,
                    clip_high,
                } => ratio
                    .f_clamp(clip_low, clip_high)?
                    .f_detach()?
                    .f_mul(lp)?
                    .f_mul(&adv)?,
                LossFn::Dro { beta } => {
                    let penalty = lp
                        .f_sub(&q)?
                        .f_pow_tensor_scalar(2)?
                        .f_mul_scalar(0.5 * beta)?;
                    lp.f_mul(&adv)?.f_sub(&penalty)?
                }
                LossFn::Gspo {
                    clip_low,
                    clip_high,
                } => {
                    // Value exp(sequence log ratio); gradient through the token's own lp. The
                    // ratio's log is bounded (±KL_LOG_RATIO_BOUND), so it stays finite in f32
                    // and a token of advantage 0 (padding included) has loss 0, not NaN.
                    let rows = if lp.dim() == 2 { lp.size()[0] } else { 1 };
                    if sequence_log_ratios.len() as i64 != rows {
                        return Err(ModelError::invalid(
                            "sequence_log_ratios",
                            format!("{} ratios for {rows} rows", sequence_log_ratios.len()),
                        ));
                    }
                    let per_row: Vec<f32> = sequence_log_ratios
                        .iter()
                        .map(|&r| r.clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND) as f32)
                        .collect();
                    // `[rows, 1]` (or `[1]`), broadcast over each row's positions.
                    let s = float_tensor(&per_row, &lp.f_narrow(-1, 0, 1)?)?;
                    let ratio = lp.f_sub(&lp.f_detach()?)?.f_add(&s)?.f_exp()?;
                    let unclipped = ratio.f_mul(&adv)?;
                    let clipped = ratio.f_clamp(clip_low, clip_high)?.f_mul(&adv)?;
                    unclipped.f_minimum(&clipped)?
                }
                LossFn::StableReinforce {
                    clip_high,
                    kl_coeff,
                } => {
                    let recorded = policy(&inputs.recorded, "recorded")?;
                    let weight = ratio.f_clamp_max(clip_high)?.f_detach()?;
                    let reinforce = weight.f_mul(lp)?.f_mul(&adv)?;
                    // k3: r - 1 - log r >= 0, an unbiased estimate of KL(sampler ‖ policy); its
                    // log ratio is bounded (±KL_LOG_RATIO_BOUND) so it stays finite in f32.
                    let log_ratio = lp
                        .f_sub(&q)?
                        .f_clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)?;
                    let k3 = log_ratio.f_exp()?.f_sub_scalar(1.0)?.f_sub(&log_ratio)?;
                    reinforce
                        .f_sub(&k3.f_mul_scalar(kl_coeff)?)?
                        .f_mul(&recorded)?
                }
                LossFn::CrossEntropy => unreachable!("handled above"),
            }
        }
    };
    let objective = match weights {
        Some(w) => objective.f_mul(&w)?,
        None => objective,
    };
    Ok(objective.f_neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_loss_and_config_are_named() {
        let err = LossFn::from_name("hinge", &[]).unwrap_err();
        assert!(err.to_string().contains("loss_fn") && err.to_string().contains("hinge"));
        let err = LossFn::from_name("ppo", &[("clip_epsilon".into(), 0.2)]).unwrap_err();
        assert!(
            err.to_string().contains("loss_fn_config.clip_epsilon"),
            "{err}"
        );
        let err = LossFn::from_name("ppo", &[("clip_low_threshold".into(), f64::NAN)]).unwrap_err();
        assert!(err.to_string().contains("clip_low_threshold"), "{err}");
    }

    #[test]
    fn ppo_defaults_match_the_sdk() {
        assert_eq!(
            LossFn::from_name("ppo", &[]).unwrap(),
            LossFn::Ppo {
                clip_low: 0.8,
                clip_high: 1.2
            }
        );
    }

    #[test]
    fn inputs_are_validated_by_name() {
        let inputs = LossInputs {
            target_tokens: vec![1, 2, 3],
            weights: Some(vec![1.0, f32::NAN, 1.0]),
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: None,
        };
        let err = inputs.validate(&LossFn::CrossEntropy, 3, 10).unwrap_err();
        assert!(err.to_string().contains("loss_fn_inputs.weights"), "{err}");
        let err = inputs.validate(&LossFn::CrossEntropy, 4, 10).unwrap_err();
        assert!(err.to_string().contains("target_tokens"), "{err}");
        let err = inputs
            .validate(&LossFn::ImportanceSampling, 3, 10)
            .unwrap_err();
        assert!(
            err.to_string().contains("weights") || err.to_string().contains("logprobs"),
            "{err}"
        );
        let unweighted = LossInputs {
            weights: None,
            ..inputs.clone()
        };
        unweighted.validate(&LossFn::CrossEntropy, 3, 10).unwrap();
        let lp = Tensor::from_slice(&[-1.0f32, -2.0, -0.5]);
        let loss = elementwise_loss(&LossFn::CrossEntropy, &lp, &unweighted, &[0.0]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&loss).unwrap(), vec![1.0, 2.0, 0.5]);
        let oov = LossInputs {
            target_tokens: vec![1, 10, 3],
            weights: Some(vec![1.0; 3]),
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: None,
        };
        assert!(oov
            .validate(&LossFn::CrossEntropy, 3, 10)
            .unwrap_err()
            .to_string()
            .contains("10"));
    }

    #[test]
    fn top_k_targets_are_cross_entropy_only_and_shaped_n_by_k() {
        let top2 = LossInputs {
            target_tokens: vec![1, 2, 3, 4, 5, 6],
            weights: Some(vec![0.5; 6]),
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: Some(2),
        };
        top2.validate(&LossFn::CrossEntropy, 3, 10).unwrap();
        let err = top2.validate(&LossFn::CrossEntropy, 2, 10).unwrap_err();
        assert!(err.to_string().contains("2 positions x 2"), "{err}");
        let policy = LossInputs {
            logprobs: Some(vec![0.0; 3]),
            advantages: Some(vec![1.0; 3]),
            ..top2.clone()
        };
        let err = policy
            .validate(&LossFn::ImportanceSampling, 3, 10)
            .unwrap_err();
        assert!(err.to_string().contains("cross_entropy"), "{err}");
        let short_weights = LossInputs {
            weights: Some(vec![0.5; 3]),
            ..top2.clone()
        };
        let err = short_weights
            .validate(&LossFn::CrossEntropy, 3, 10)
            .unwrap_err();
        assert!(err.to_string().contains("loss_fn_inputs.weights"), "{err}");
        let oov = LossInputs {
            target_tokens: vec![1, 2, 3, 4, 10, 6],
            ..top2.clone()
        };
        let err = oov.validate(&LossFn::CrossEntropy, 3, 10).unwrap_err();
        assert!(err.to_string().contains("position [2, 0]"), "{err}");
        let wide = LossInputs {
            target_tokens: vec![1; 3 * (MAX_TARGETS_PER_POSITION + 1)],
            weights: None,
            targets_per_position: Some(MAX_TARGETS_PER_POSITION + 1),
            ..top2
        };
        let err = wide
            .validate(&LossFn::CrossEntropy, 3, 100_000)
            .unwrap_err();
        assert!(err.to_string().contains("1024"), "{err}");
        let beyond_the_vocabulary = LossInputs {
            target_tokens: vec![1; 3 * 11],
            targets_per_position: Some(11),
            ..wide
        };
        let err = beyond_the_vocabulary
            .validate(&LossFn::CrossEntropy, 3, 10)
            .unwrap_err();
        assert!(err.to_string().contains("1 to 10"), "{err}");
    }

    #[test]
    fn gspo_carries_the_sequence_ratio_and_each_tokens_own_gradient() {
        let inputs = LossInputs {
            target_tokens: vec![1, 2, 3],
            weights: None,
            logprobs: Some(vec![-1.1, -2.3, -0.9]),
            advantages: Some(vec![1.0, 1.0, -0.5]),
            sequence_ratio_mask: Some(vec![0.0, 1.0, 1.0]),
            recorded: None,
            targets_per_position: None,
        };
        let lp_values = [-1.0f32, -2.0, -0.5];
        // Over the masked positions: ((-2.0 + 2.3) + (-0.5 + 0.9)) / 2.
        let log_ratio = sequence_log_ratio(&lp_values, &inputs);
        assert!((log_ratio - 0.35).abs() < 1e-6, "{log_ratio}");
        let s = log_ratio.exp();
        let lp = Tensor::from_slice(&lp_values).set_requires_grad(true);
        let gspo = LossFn::from_name("gspo", &[]).unwrap();
        let loss = elementwise_loss(&gspo, &lp, &inputs, &[log_ratio]).unwrap();
        // s = 1.419 > 1.2: positive advantages take the clipped (constant) term; the negative
        // one keeps s · A, whose gradient with respect to its own lp is s · A.
        let want = [-1.2, -1.2, 0.5 * s];
        let got = Vec::<f32>::try_from(&loss).unwrap();
        assert!(
            got.iter()
                .zip(want)
                .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-5),
            "{got:?}"
        );
        loss.sum(Kind::Float).backward();
        let grad = Vec::<f32>::try_from(&lp.grad()).unwrap();
        let want = [0.0, 0.0, 0.5 * s];
        assert!(
            grad.iter()
                .zip(want)
                .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-5),
            "{grad:?}"
        );
        let missing = LossInputs {
            sequence_ratio_mask: None,
            ..inputs
        };
        let err = missing.validate(&gspo, 3, 10).unwrap_err();
        assert!(err.to_string().contains("sequence_ratio_mask"), "{err}");
    }

    #[test]
    fn stable_reinforce_truncates_the_weight_and_pulls_toward_the_sampler() {
        let inputs = LossInputs {
            target_tokens: vec![1, 2, 3],
            weights: None,
            logprobs: Some(vec![0.0, -2.5, -0.4]),
            advantages: Some(vec![0.0, 2.0, -1.0]),
            sequence_ratio_mask: None,
            recorded: Some(vec![0.0, 1.0, 1.0]),
            targets_per_position: None,
        };
        let lp_values = [-1.0f64, -2.0, -0.5];
        let loss = LossFn::from_name("stable_reinforce", &[("kl_coeff".into(), 0.5)]).unwrap();
        inputs.validate(&loss, 3, 10).unwrap();
        let lp = Tensor::from_slice(&lp_values.map(|v| v as f32)).set_requires_grad(true);
        let per_token = elementwise_loss(&loss, &lp, &inputs, &[0.0]).unwrap();
        // Position 0 is a prompt token (not recorded): no loss, no gradient.
        // Position 1: r = e^0.5 = 1.649 < 2; position 2: r = e^-0.1.
        let (lp1, lp2) = (lp_values[1], lp_values[2]);
        let (r1, r2) = ((0.5f64).exp(), (-0.1f64).exp());
        let k3 = |r: f64| r - 1.0 - r.ln();
        let want = [
            0.0,
            -(r1 * lp1 * 2.0 - 0.5 * k3(r1)),
            -(-(r2 * lp2) - 0.5 * k3(r2)),
        ];
        let got = Vec::<f32>::try_from(&per_token).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        per_token.sum(Kind::Float).backward();
        // d/dlp: -(sg(min(r, 2)) · A - κ · (r - 1)).
        let want = [
            0.0,
            -(r1 * 2.0 - 0.5 * (r1 - 1.0)),
            -(-r2 - 0.5 * (r2 - 1.0)),
        ];
        let grad = Vec::<f32>::try_from(&lp.grad()).unwrap();
        for (g, w) in grad.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{grad:?} vs {want:?}");
        }
        // A ratio above the cap contributes the capped weight.
        let far = LossInputs {
            logprobs: Some(vec![0.0, -4.0, -0.4]),
            ..inputs.clone()
        };
        let lp = Tensor::from_slice(&lp_values.map(|v| v as f32)).set_requires_grad(true);
        let capped = LossFn::from_name("stable_reinforce", &[]).unwrap();
        elementwise_loss(&capped, &lp, &far, &[0.0])
            .unwrap()
            .sum(Kind::Float)
            .backward();
        let grad = Vec::<f32>::try_from(&lp.grad()).unwrap();
        assert!((f64::from(grad[1]) + 2.0 * 2.0).abs() < 1e-5, "{grad:?}");
        let unrecorded = LossInputs {
            recorded: None,
            ..inputs
        };
        let err = unrecorded.validate(&loss, 3, 10).unwrap_err();
        assert!(err.to_string().contains("loss_fn_input_spans"), "{err}");
        let err = LossFn::from_name("stable_reinforce", &[("kl_coeff".into(), -1.0)]).unwrap_err();
        assert!(err.to_string().contains("kl_coeff"), "{err}");
    }
}
