//! Adam with bias correction, decoupled weight decay and optional gradient clipping, exactly as
//! `torch.optim.AdamW` (which is `torch.optim.Adam` when `weight_decay` is 0) and
//! `torch.nn.utils.clip_grad_norm_` compute them.

use tch::Tensor;

use crate::error::{ModelError, Result};

/// The SDK's `AdamParams`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamParams {
    /// Step size (> 0).
    pub learning_rate: f64,
    /// First-moment decay, in `[0, 1)`.
    pub beta1: f64,
    /// Second-moment decay, in `[0, 1)`.
    pub beta2: f64,
    /// Denominator epsilon (> 0).
    pub eps: f64,
    /// Decoupled weight decay (≥ 0).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    /// The SDK's defaults.
    fn default() -> Self {
        AdamParams {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}

impl AdamParams {
    /// Rejects NaN, infinite, negative or out-of-range values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let field = |name: &str, v: f64, ok: bool, want: &str| -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(ModelError::invalid(
                    format!("adam_params.{name}"),
                    format!("must be {want}, got {v}"),
                ))
            }
        };
        field(
            "learning_rate",
            self.learning_rate,
            self.learning_rate >= 0.0,
            "a finite number >= 0",
        )?;
        field(
            "beta1",
            self.beta1,
            (0.0..1.0).contains(&self.beta1),
            "in [0, 1)",
        )?;
        field(
            "beta2",
            self.beta2,
            (0.0..1.0).contains(&self.beta2),
            "in [0, 1)",
        )?;
        field("eps", self.eps, self.eps > 0.0, "a finite number > 0")?;
        field(
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            "a finite number >= 0",
        )?;
        field(
            "grad_clip_norm",
            self.grad_clip_norm,
            self.grad_clip_norm >= 0.0,
            "a finite number >= 0",
        )?;
        Ok(())
    }
}

/// Per-adapter optimizer state: step count and both moments of every parameter.
pub struct AdamState {
    /// Steps taken.
    pub step: i64,
    /// First moments, aligned with the adapter's parameters.
    pub exp_avg: Vec<Tensor>,
    /// Second moments, aligned with the adapter's parameters.
    pub exp_avg_sq: Vec<Tensor>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Step count after the step.
    pub step: i64,
}

impl AdamState {
    /// Zero moments for `params`.
    pub fn new(params: &[&Tensor]) -> Result<Self> {
        let zeros =
            |p: &&Tensor| -> Result<Tensor> { Ok(p.f_zeros_like()?.set_requires_grad(false)) };
        Ok(AdamState {
            step: 0,
            exp_avg: params.iter().map(zeros).collect::<Result<_>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<Result<_>>()?,
        })
    }

    /// Applies one step to `params` using their accumulated gradients, then zeroes the gradients.
    /// Parameters without a gradient (never reached by a backward) are left untouched.
    pub fn step(&mut self, params: &[&Tensor], hp: &AdamParams) -> Result<StepStats> {
        hp.validate()?;
        if params.len() != self.exp_avg.len() {
            return Err(ModelError::invalid(
                "optimizer_state",
                format!(
                    "has {} moments for {} parameters",
                    self.exp_avg.len(),
                    params.len()
                ),
            ));
        }
        tch::no_grad(|| -> Result<StepStats> {
            let grads: Vec<Option<Tensor>> = params
                .iter()
                .map(|p| {
                    let g = p.grad();
                    g.defined().then_some(g)
                })
                .collect();
            let mut sq_sum = 0.0;
            for g in grads.iter().flatten() {
                sq_sum += g
                    .f_pow_tensor_scalar(2)?
                    .f_sum(tch::Kind::Double)?
                    .f_double_value(&[])?;
            }
            let grad_norm = sq_sum.sqrt();
            if !grad_norm.is_finite() {
                // Discarded, or every later step of this run would fail the same way.
                zero_grads(params)?;
                return Err(ModelError::invalid(
                    "gradients",
                    "the accumulated gradient is not finite; the step was not applied and the gradients were discarded",
                ));
            }
            let clip = if hp.grad_clip_norm > 0.0 {
                (hp.grad_clip_norm / (grad_norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            self.step += 1;
            let t = self.step as i32;
            let bias1 = 1.0 - hp.beta1.powi(t);
            let bias2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt();
            let step_size = hp.learning_rate / bias1;
            for (i, p) in params.iter().enumerate() {
                let Some(g) = &grads[i] else { continue };
                let g = if clip < 1.0 {
                    g.f_mul_scalar(clip)?
                } else {
                    g.shallow_clone()
                };
                let mut p = (*p).shallow_clone();
                if hp.weight_decay > 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - hp.learning_rate * hp.weight_decay)?;
                }
                let m = &mut self.exp_avg[i];
                let _ = m.f_lerp_(&g, 1.0 - hp.beta1)?;
                let v = &mut self.exp_avg_sq[i];
                let _ = v.f_mul_scalar_(hp.beta2)?;
                let _ = v.f_addcmul_(&g, &g.f_mul_scalar(1.0 - hp.beta2)?)?;
                let denom = v.f_sqrt()?.f_div_scalar(bias2_sqrt)?.f_add_scalar(hp.eps)?;
                let update = m.f_div(&denom)?.f_mul_scalar(step_size)?;
                let _ = p.f_sub_(&update)?;
            }
            zero_grads(params)?;
            Ok(StepStats {
                grad_norm,
                step: self.step,
            })
        })
    }
}

/// Zeroes the accumulated gradients of `params` (those that have one).
pub fn zero_grads(params: &[&Tensor]) -> Result<()> {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}
