//! Adam with bias correction, decoupled weight decay and optional gradient clipping, exactly as
//! `torch.optim.AdamW` (which is `torch.optim.Adam` when `weight_decay` is 0) and
//! `torch.nn.utils.clip_grad_norm_` compute them.
//!
//! [`step_many`] steps many adapters at once: the adapters' weights, gradients and moments are
//! rows of their layout's slab ([`crate::slab`]), so one step gathers the rows of every run in
//! the batch, applies AdamW with each run's own hyperparameters as per-row factors, and writes
//! the rows back: a fixed number of kernels per slab (and per memory-bounded column chunk), not
//! per run or per tensor.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::lora::LoraAdapter;
use crate::slab::{Field, Slab, SlabTensors};

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

/// Largest accepted learning rate. An Adam step moves each weight by about the learning rate,
/// so beyond this a single step overflows activations and leaves the run producing NaN for good
/// (its gradients are then discarded at every step); useful LoRA rates are below 1e-2.
pub const MAX_LEARNING_RATE: f64 = 10.0;

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
            (0.0..=MAX_LEARNING_RATE).contains(&self.learning_rate),
            &format!("in [0, {MAX_LEARNING_RATE}]"),
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
        // Decoupled decay scales the weights by 1 - lr * wd each step: beyond 1 it flips their
        // sign and grows them until they overflow.
        field(
            "weight_decay",
            self.weight_decay,
            self.learning_rate * self.weight_decay <= 1.0,
            &format!(
                "at most 1 / learning_rate = {} (each step scales the weights by 1 - learning_rate * weight_decay)",
                1.0 / self.learning_rate
            ),
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

/// Per-run optimizer state besides the moments (which live in the adapter's slab row).
#[derive(Debug)]
pub struct AdamState {
    /// Steps taken.
    pub step: i64,
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
    /// A fresh optimizer for `adapter`: step 0, moments zeroed.
    pub fn new(adapter: &LoraAdapter) -> Result<Self> {
        adapter.row().zero(Field::ExpAvg)?;
        adapter.row().zero(Field::ExpAvgSq)?;
        Ok(AdamState { step: 0 })
    }

    /// Applies one step to `adapter` using its accumulated gradients, then zeroes them.
    pub fn step(&mut self, adapter: &LoraAdapter, hp: &AdamParams) -> Result<StepStats> {
        let mut jobs = [StepJob {
            adapter,
            state: self,
            params: *hp,
        }];
        step_many(&mut jobs).pop().expect("one result per job")
    }
}

/// One run's share of a fused optimizer step.
pub struct StepJob<'a> {
    /// The run's adapter.
    pub adapter: &'a LoraAdapter,
    /// Its optimizer state.
    pub state: &'a mut AdamState,
    /// Its hyperparameters.
    pub params: AdamParams,
}

/// Elements of one gathered temporary (`[runs, columns]`): bounds the step's extra memory.
const CHUNK_ELEMENTS: i64 = 1 << 26;

/// Steps every job's adapter with its own hyperparameters, then zeroes its gradients; one
/// result per job, in order. A run whose gradient norm is not finite is not stepped (its
/// gradients are discarded, or every later step would fail the same way); a run whose new
/// weights are not finite fails [`ModelError::NonFiniteStep`] (its step is not counted, and its
/// row and moments hold the bad step until the caller restores them); invalid hyperparameters
/// fail only their own job.
pub fn step_many(jobs: &mut [StepJob]) -> Vec<Result<StepStats>> {
    let mut results: Vec<Option<Result<StepStats>>> = jobs
        .iter()
        .map(|j| j.params.validate().err().map(Err))
        .collect();
    let mut groups: Vec<(Arc<Slab>, Vec<usize>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        if results[i].is_some() {
            continue;
        }
        let slab = job.adapter.row().slab();
        match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, slab)) {
            Some((_, members)) => members.push(i),
            None => groups.push((slab.clone(), vec![i])),
        }
    }
    for (slab, members) in groups {
        match step_group(&slab, jobs, &members) {
            Ok(outcomes) => {
                for (i, outcome) in members.into_iter().zip(outcomes) {
                    results[i] = Some(outcome);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for i in members {
                    results[i] = Some(Err(ModelError::Torch(tch::TchError::Torch(
                        message.clone(),
                    ))));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every job has a result"))
        .collect()
}

/// Per-run factors of one step, as `[runs, 1]` f32 columns.
struct Factors {
    clip: Option<Tensor>,
    decay: Option<Tensor>,
    one_minus_beta1: Tensor,
    beta2: Tensor,
    one_minus_beta2: Tensor,
    bias2_sqrt: Tensor,
    eps: Tensor,
    step_size: Tensor,
}

impl Factors {
    fn new(runs: &[(AdamParams, f64, i64)], device: Device) -> Result<Self> {
        let column = |f: &dyn Fn(&(AdamParams, f64, i64)) -> f64| -> Result<Tensor> {
            let values: Vec<f32> = runs.iter().map(|r| f(r) as f32).collect();
            Ok(Tensor::from_slice(&values)
                .f_to_device(device)?
                .f_view([-1, 1])?)
        };
        let clip_of = |(hp, norm, _): &(AdamParams, f64, i64)| {
            if hp.grad_clip_norm > 0.0 {
                (hp.grad_clip_norm / (norm + 1e-6)).min(1.0)
            } else {
                1.0
            }
        };
        let any_clip = runs.iter().any(|r| clip_of(r) < 1.0);
        let any_decay = runs.iter().any(|(hp, _, _)| hp.weight_decay > 0.0);
        Ok(Factors {
            clip: if any_clip {
                Some(column(&clip_of)?)
            } else {
                None
            },
            decay: if any_decay {
                Some(column(&|(hp, _, _)| {
                    1.0 - hp.learning_rate * hp.weight_decay
                })?)
            } else {
                None
            },
            one_minus_beta1: column(&|(hp, _, _)| 1.0 - hp.beta1)?,
            beta2: column(&|(hp, _, _)| hp.beta2)?,
            one_minus_beta2: column(&|(hp, _, _)| 1.0 - hp.beta2)?,
            bias2_sqrt: column(&|(hp, _, t)| (1.0 - hp.beta2.powi(*t as i32)).sqrt())?,
            eps: column(&|(hp, _, _)| hp.eps)?,
            step_size: column(&|(hp, _, t)| hp.learning_rate / (1.0 - hp.beta1.powi(*t as i32)))?,
        })
    }
}

/// The slab rows a step reads and updates: a range is used in place through views; other sets
/// are gathered into temporaries and written back.
enum Selected {
    /// `n` consecutive rows from `lo`.
    Range(i64, i64),
    /// Rows by index (ascending).
    Index(Tensor),
}

impl Selected {
    /// `rows` must be ascending.
    fn of(rows: &[i64], device: Device) -> Result<Self> {
        let consecutive = rows.windows(2).all(|w| w[1] == w[0] + 1);
        Ok(if consecutive {
            Selected::Range(rows[0], rows.len() as i64)
        } else {
            Selected::Index(Tensor::from_slice(rows).f_to_device(device)?)
        })
    }

    fn len(&self) -> i64 {
        match self {
            Selected::Range(_, n) => *n,
            Selected::Index(index) => index.size()[0],
        }
    }

    /// The selected rows of `columns` (`[capacity, width]`): a view for a range, else a copy.
    fn take(&self, columns: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Selected::Range(lo, n) => columns.f_narrow(0, *lo, *n)?,
            Selected::Index(index) => columns.f_index_select(0, index)?,
        })
    }

    /// Zeroes the selected rows of `tensor`.
    fn zero(&self, tensor: &Tensor) -> Result<()> {
        let _ = match self {
            Selected::Range(lo, n) => tensor.f_narrow(0, *lo, *n)?.f_zero_()?,
            Selected::Index(index) => tensor.shallow_clone().f_index_fill_(0, index, 0.0)?,
        };
        Ok(())
    }

    /// Column chunks `(start, width)` of a `numel`-wide row that bound each temporary of a step
    /// over these rows to [`CHUNK_ELEMENTS`].
    fn chunks(&self, numel: i64) -> impl Iterator<Item = (i64, i64)> {
        let cols = (CHUNK_ELEMENTS / self.len().max(1)).clamp(1, numel.max(1));
        (0..numel)
            .step_by(cols as usize)
            .map(move |start| (start, cols.min(numel - start)))
    }
}

/// Each selected row's gradient norm (one host transfer for all of them).
fn grad_norms(t: &SlabTensors, rows: &Selected, numel: i64, device: Device) -> Result<Vec<f64>> {
    let mut sq = Tensor::f_zeros([rows.len()], (Kind::Double, device))?;
    for (start, width) in rows.chunks(numel) {
        let g = rows.take(&t.grads.f_narrow(1, start, width)?)?;
        sq = sq.f_add(&g.f_square()?.f_sum_dim_intlist(1, false, Kind::Double)?)?;
    }
    Ok(Vec::<f64>::try_from(
        sq.f_sqrt()?.f_to_device(Device::Cpu)?,
    )?)
}

/// AdamW on the selected rows (row `i` with the factors' row `i`), then their gradients zeroed.
/// Whether each row's new weights are all finite (one host transfer for all of them).
fn adamw(t: &SlabTensors, rows: &Selected, f: &Factors, numel: i64) -> Result<Vec<bool>> {
    let mut sums: Option<Tensor> = None;
    for (start, width) in rows.chunks(numel) {
        let gather = |field: &Tensor| rows.take(&field.f_narrow(1, start, width)?);
        let mut g = gather(&t.grads)?;
        if let Some(clip) = &f.clip {
            g = g.f_mul(clip)?;
        }
        let mut p = gather(&t.params)?;
        if let Some(decay) = &f.decay {
            let _ = p.f_mul_(decay)?;
        }
        let mut m = gather(&t.exp_avg)?;
        let _ = m.f_lerp_tensor_(&g, &f.one_minus_beta1)?;
        let mut v = gather(&t.exp_avg_sq)?;
        let _ = v.f_mul_(&f.beta2)?;
        let _ = v.f_addcmul_(&g, &g.f_mul(&f.one_minus_beta2)?)?;
        let denom = v.f_sqrt()?.f_div(&f.bias2_sqrt)?.f_add(&f.eps)?;
        let _ = p.f_sub_(&m.f_div(&denom)?.f_mul(&f.step_size)?)?;
        // A row's sum is finite exactly when all its weights are (NaN and infinities carry
        // through a sum; finite weights large enough to overflow it are broken anyway).
        let chunk_sums = p.f_sum_dim_intlist(1, false, Kind::Float)?;
        sums = Some(match sums {
            Some(so_far) => so_far.f_add(&chunk_sums)?,
            None => chunk_sums,
        });
        if let Selected::Index(index) = rows {
            for (field, value) in [(&t.params, &p), (&t.exp_avg, &m), (&t.exp_avg_sq, &v)] {
                let _ = field
                    .f_narrow(1, start, width)?
                    .f_index_copy_(0, index, value)?;
            }
        }
    }
    rows.zero(&t.grads)?;
    Ok(match sums {
        Some(sums) => Vec::<f32>::try_from(sums.f_to_device(Device::Cpu)?)?
            .into_iter()
            .map(f32::is_finite)
            .collect(),
        None => vec![true; rows.len() as usize],
    })
}

/// One fused step over `members` (indices into `jobs`), all rows of `slab`.
fn step_group(
    slab: &Slab,
    jobs: &mut [StepJob],
    members: &[usize],
) -> Result<Vec<Result<StepStats>>> {
    let device = slab.device();
    let numel = slab.layout().numel;
    let rows: Vec<i64> = members
        .iter()
        .map(|&i| jobs[i].adapter.row().index())
        .collect();
    // Row order: rows allocated together form a range, read and updated in place.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&m| rows[m]);
    let rows_of = |ms: &[usize]| -> Vec<i64> { ms.iter().map(|&m| rows[m]).collect() };
    let mut outcomes: Vec<Option<Result<StepStats>>> = members.iter().map(|_| None).collect();
    slab.with(|t| {
        tch::no_grad(|| -> Result<()> {
            let all = Selected::of(&rows_of(&order), device)?;
            let norms = grad_norms(t, &all, numel, device)?;
            let mut stepping = Vec::new();
            let mut runs: Vec<(AdamParams, f64, i64)> = Vec::new();
            for (&m, &norm) in order.iter().zip(&norms) {
                let job = &jobs[members[m]];
                if norm.is_finite() {
                    stepping.push(m);
                    runs.push((job.params, norm, job.state.step + 1));
                    continue;
                }
                let _ = t.grads.f_select(0, rows[m])?.f_zero_()?;
                job.adapter.zero_grad_flag();
                outcomes[m] = Some(Err(ModelError::invalid(
                    "gradients",
                    "the accumulated gradient is not finite; the step was not applied and the gradients were discarded",
                )));
            }
            if stepping.is_empty() {
                return Ok(());
            }
            let selected = if stepping.len() == order.len() {
                all
            } else {
                Selected::of(&rows_of(&stepping), device)?
            };
            let finite = adamw(t, &selected, &Factors::new(&runs, device)?, numel)?;
            for ((&m, (_, norm, step)), finite) in stepping.iter().zip(&runs).zip(finite) {
                let job = &mut jobs[members[m]];
                job.adapter.zero_grad_flag();
                if !finite {
                    outcomes[m] = Some(Err(ModelError::NonFiniteStep));
                    continue;
                }
                job.state.step = *step;
                outcomes[m] = Some(Ok(StepStats {
                    grad_norm: *norm,
                    step: *step,
                }));
            }
            Ok(())
        })
    })?;
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every run has an outcome"))
        .collect())
}
