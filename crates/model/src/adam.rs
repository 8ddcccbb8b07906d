//! Adam with bias correction, decoupled weight decay and optional gradient clipping, exactly as
//! `torch.optim.AdamW` (which is `torch.optim.Adam` when `weight_decay` is 0) and
//! `torch.nn.utils.clip_grad_norm_` compute them.
//!
//! [`step_many`] steps many adapters at once: the adapters' weights, gradients and moments are
//! rows of their layout's slab ([`crate::slab`]), and one step hands the rows of every run in
//! the batch, as tensor lists, to PyTorch's fused multi-tensor AdamW kernel (the one
//! `torch.optim.AdamW(fused=True)` uses), once per distinct set of hyperparameters: each weight,
//! gradient and moment is read and written once, in place, and the number of kernels does not
//! grow with the number of runs. Gradient norms, clipping and the finiteness check are per row.

use std::sync::{Arc, LazyLock};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::lora::LoraAdapter;
use crate::slab::{Field, Slab, SlabTensors};

/// The SDK's `AdamParams`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// The indices of `items` (`(index, key)`) grouped by key (`same`), groups in first-seen order.
fn group_by<K>(
    items: impl IntoIterator<Item = (usize, K)>,
    same: impl Fn(&K, &K) -> bool,
) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, key) in items {
        match groups.iter_mut().find(|(k, _)| same(k, &key)) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
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
    let valid = jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| results[*i].is_none())
        .map(|(i, job)| (i, job.adapter.row().slab().clone()));
    for (slab, members) in group_by(valid, Arc::ptr_eq) {
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

/// PyTorch's fused multi-tensor AdamW (`torch._fused_adamw_`, which tch does not bind) as a
/// TorchScript module holding only that call; written by `scripts/make_fused_adamw.py`.
static FUSED_ADAMW_MODULE: &[u8] = include_bytes!("../assets/fused_adamw.pt");

/// The loaded module, or why it could not be loaded (kept, so every step reports it).
static FUSED_ADAMW: LazyLock<std::result::Result<CModule, String>> = LazyLock::new(|| {
    CModule::load_data(&mut &FUSED_ADAMW_MODULE[..])
        .map_err(|e| format!("loading the fused AdamW module: {e}"))
});

/// The slab rows a step reads and updates.
enum Selected {
    /// `n` consecutive rows from `lo`: one kernel per reduction over all of them.
    Range(i64, i64),
    /// Rows by index (ascending): one kernel per row.
    Rows(Vec<i64>),
}

impl Selected {
    /// `rows` must be ascending and not empty.
    fn of(rows: &[i64]) -> Self {
        if rows.windows(2).all(|w| w[1] == w[0] + 1) {
            Selected::Range(rows[0], rows.len() as i64)
        } else {
            Selected::Rows(rows.to_vec())
        }
    }

    /// `reduce` (over the last dimension) of each selected row of `tensor`, copied to the host
    /// in one transfer.
    fn reduce(
        &self,
        tensor: &Tensor,
        reduce: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<f32>> {
        let per_row = match self {
            Selected::Range(lo, n) => reduce(&tensor.f_narrow(0, *lo, *n)?)?,
            Selected::Rows(rows) => {
                let each = rows
                    .iter()
                    .map(|&r| reduce(&tensor.f_select(0, r)?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::f_stack(&each, 0)?
            }
        };
        Ok(Vec::<f32>::try_from(per_row.f_to_device(Device::Cpu)?)?)
    }

    /// Zeroes the selected rows of `tensor`.
    fn zero(&self, tensor: &Tensor) -> Result<()> {
        match self {
            Selected::Range(lo, n) => {
                let _ = tensor.f_narrow(0, *lo, *n)?.f_zero_()?;
            }
            Selected::Rows(rows) => {
                for &r in rows {
                    let _ = tensor.f_select(0, r)?.f_zero_()?;
                }
            }
        }
        Ok(())
    }
}

/// Each selected row's gradient norm (f32, as `torch.nn.utils.clip_grad_norm_` computes it).
fn grad_norms(t: &SlabTensors, rows: &Selected) -> Result<Vec<f32>> {
    rows.reduce(&t.grads, |g| {
        Ok(g.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), false)?)
    })
}

/// One run's share of [`adamw`].
struct RowStep {
    row: i64,
    params: AdamParams,
    grad_norm: f64,
    /// The step being taken (1 for the first).
    step: i64,
}

impl RowStep {
    /// The factor `clip_grad_norm_` scales this run's gradients by, when it clips them.
    fn clip(&self) -> Option<f64> {
        let max = self.params.grad_clip_norm;
        let factor = max / (self.grad_norm + 1e-6);
        (max > 0.0 && factor < 1.0).then_some(factor)
    }

    /// What must be equal for runs to share one call of the fused kernel.
    fn group_key(&self) -> [u64; 5] {
        let hp = &self.params;
        [
            hp.learning_rate,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
        ]
        .map(f64::to_bits)
    }
}

/// AdamW on each run's row with its own hyperparameters: its gradients clipped in place where
/// its `grad_clip_norm` asks, then one call of the fused kernel per distinct set of the other
/// hyperparameters (usually one for the whole batch) over the rows as a tensor list, updating
/// weights and moments in place. The caller zeroes the gradients.
fn adamw(t: &SlabTensors, runs: &[RowStep], device: Device) -> Result<()> {
    let module = FUSED_ADAMW
        .as_ref()
        .map_err(|e| ModelError::Torch(tch::TchError::Torch(e.clone())))?;
    for run in runs {
        if let Some(clip) = run.clip() {
            let _ = t.grads.f_select(0, run.row)?.f_mul_scalar_(clip)?;
        }
    }
    // The kernel reads each tensor's step from a device tensor, as torch.optim keeps it.
    let steps: Vec<f32> = runs.iter().map(|r| r.step as f32).collect();
    let steps = Tensor::from_slice(&steps).f_to_device(device)?;
    let keys = runs.iter().map(RowStep::group_key).enumerate();
    for (_, members) in group_by(keys, |a, b| a == b) {
        let rows_of = |field: &Tensor| -> Result<IValue> {
            let rows = members
                .iter()
                .map(|&i| field.f_select(0, runs[i].row))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(IValue::TensorList(rows))
        };
        let step_list = members
            .iter()
            .map(|&i| steps.f_select(0, i as i64))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let hp = &runs[members[0]].params;
        module.forward_is(&[
            rows_of(&t.params)?,
            rows_of(&t.grads)?,
            rows_of(&t.exp_avg)?,
            rows_of(&t.exp_avg_sq)?,
            IValue::TensorList(step_list),
            IValue::Double(hp.learning_rate),
            IValue::Double(hp.beta1),
            IValue::Double(hp.beta2),
            IValue::Double(hp.weight_decay),
            IValue::Double(hp.eps),
        ])?;
    }
    Ok(())
}

/// One fused step over `members` (indices into `jobs`), all rows of `slab`.
fn step_group(
    slab: &Slab,
    jobs: &mut [StepJob],
    members: &[usize],
) -> Result<Vec<Result<StepStats>>> {
    let device = slab.device();
    let rows: Vec<i64> = members
        .iter()
        .map(|&i| jobs[i].adapter.row().index())
        .collect();
    // Row order: rows allocated together form a range, reduced and zeroed by one kernel each.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&m| rows[m]);
    let rows_of = |ms: &[usize]| -> Vec<i64> { ms.iter().map(|&m| rows[m]).collect() };
    let mut outcomes: Vec<Option<Result<StepStats>>> = members.iter().map(|_| None).collect();
    slab.with(|t| {
        tch::no_grad(|| -> Result<()> {
            let all = Selected::of(&rows_of(&order));
            let norms = grad_norms(t, &all)?;
            let mut stepping = Vec::new();
            let mut runs = Vec::new();
            for (&m, &norm) in order.iter().zip(&norms) {
                let job = &jobs[members[m]];
                if norm.is_finite() {
                    stepping.push(m);
                    runs.push(RowStep {
                        row: rows[m],
                        params: job.params,
                        grad_norm: f64::from(norm),
                        step: job.state.step + 1,
                    });
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
                Selected::of(&rows_of(&stepping))
            };
            adamw(t, &runs, device)?;
            selected.zero(&t.grads)?;
            // A row's sum is finite exactly when all its weights are (NaN and infinities carry
            // through a sum; finite weights large enough to overflow it are broken anyway).
            let sums = selected.reduce(&t.params, |p| {
                Ok(p.f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)?)
            })?;
            for ((&m, run), sum) in stepping.iter().zip(&runs).zip(sums) {
                let job = &mut jobs[members[m]];
                job.adapter.zero_grad_flag();
                if !sum.is_finite() {
                    outcomes[m] = Some(Err(ModelError::NonFiniteStep));
                    continue;
                }
                job.state.step = run.step;
                outcomes[m] = Some(Ok(StepStats {
                    grad_norm: run.grad_norm,
                    step: run.step,
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
