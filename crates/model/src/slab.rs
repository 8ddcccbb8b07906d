//! Stacked adapter storage (S-LoRA / Punica style).
//!
//! Every adapter's trainable state lives in one row of a *slab*: per [`Layout`] (rank bucket,
//! targeted modules, model shape) and device, four `[capacity, numel]` f32 tensors hold the
//! weights, the accumulated gradients and Adam's two moments of every resident adapter of that
//! layout. A row is the concatenation, in layout order, of each adapted layer's `A`
//! (`[R, in]`) and `B` (`[out, R]`) at the bucket rank `R` (the rank rounded up to a power of
//! two); an adapter of a smaller rank leaves its padding rows of `A` and columns of `B` at zero,
//! where gradients and Adam keep them exactly. A mixture's experts are one entry per projection
//! holding every expert's `A` (`[E, R_e, in]`) and `B` (`[E, out, R_e]`) at the expert bucket
//! rank `R_e` ([`Layout::expert_rank`]).
//!
//! So work over many adapters is a handful of kernels whatever their number: a batch gathers its
//! adapters' rows with one `index_select`, adds their gradients back with one `index_add_`, and
//! one AdamW step updates every run of a batch through gathered rows (`crate::adam`).
//!
//! Concurrency: a slab's tensors are reached only under its mutex ([`Slab::with`]); a slab grows
//! by reallocating (doubling) under that mutex, so tensors or views taken from it are valid for
//! reading by the adapter's owner, and every write goes through [`Slab::with`] on the current
//! tensors. Slabs are process-wide (one per layout and device), created on first use.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::lora::{LoraSpec, Target};
use crate::moe::MAX_GROUPS;

/// What determines a row's layout: bucket rank, targeted modules and the model's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayoutKey {
    /// Bucket rank `R` (a power of two ≥ the adapter's rank).
    pub rank: i64,
    /// q/k/v/o adapted.
    pub attn: bool,
    /// gate/up/down adapted.
    pub mlp: bool,
    /// The LM head adapted.
    pub unembed: bool,
    /// Layers, hidden, intermediate, q width, k/v width, vocabulary of the model.
    pub model: [i64; 6],
    /// A mixture of experts': experts, their width, experts per token, and which layers are
    /// sparse (a bit per layer, hashed); zeros for a dense model.
    pub experts: [i64; 4],
}

impl LayoutKey {
    /// The layout of `spec`'s adapters on `config`'s model.
    pub fn of(spec: &LoraSpec, config: &ModelConfig) -> Self {
        LayoutKey {
            rank: bucket_rank(spec.rank),
            attn: spec.train_attn,
            mlp: spec.train_mlp,
            unembed: spec.train_unembed,
            model: [
                config.num_layers,
                config.hidden_size,
                config.intermediate_size,
                config.num_heads * config.head_dim,
                config.num_kv_heads * config.head_dim,
                config.vocab_size,
            ],
            experts: match &config.moe {
                None => [0; 4],
                Some(moe) => {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    moe.sparse_layers.hash(&mut h);
                    [
                        moe.num_experts,
                        moe.expert_intermediate_size,
                        moe.experts_per_token,
                        h.finish() as i64,
                    ]
                }
            },
        }
    }
}

/// The bucket a rank is stored at: the next power of two.
pub fn bucket_rank(rank: i64) -> i64 {
    (rank.max(1) as u64).next_power_of_two() as i64
}

/// The rank of each expert's adapter for an adapter of rank `rank` on a mixture of `per_token`
/// experts per token: `rank / per_token` (at least 1), so that a token's experts hold about as
/// many adapter parameters as one rank-`rank` adapter of a dense MLP would (the rule of
/// Thinking Machines' "LoRA Without Regret" for mixtures of experts).
pub fn expert_rank(rank: i64, per_token: i64) -> i64 {
    (rank / per_token.max(1)).max(1)
}

/// The bucket an expert rank is stored at: the next power of two, at least 8, so that every
/// row of the experts' grouped matmuls (`_grouped_mm`) is a multiple of 16 bytes in bf16.
fn expert_bucket(rank: i64) -> i64 {
    bucket_rank(rank).max(8)
}

/// Where one adapted layer's `A` and `B` sit in a row.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Block index (`None` for the LM head).
    pub layer: Option<usize>,
    /// The adapted layer.
    pub target: Target,
    /// Output features.
    pub out: i64,
    /// Input features.
    pub inp: i64,
    /// Experts, each with its own `A` and `B`, stored one after the other: 1 for a linear
    /// layer, `E` for a projection of a mixture's experts.
    pub experts: i64,
    /// Whether the entry is a projection of a mixture's experts (of any number of them, one
    /// included).
    pub sparse: bool,
    /// Bucket rank of the entry: the layout's, or its expert bucket rank.
    pub rank: i64,
    /// Offset of `A` (`[experts, rank, inp]`, row-major).
    pub a_offset: i64,
    /// Offset of `B` (`[experts, out, rank]`, row-major), right after `A`.
    pub b_offset: i64,
}

impl Entry {
    /// Whether the entry is a projection of a mixture's experts.
    pub fn is_experts(&self) -> bool {
        self.sparse
    }

    /// Its module path inside a `*ForCausalLM`: the target's, or for experts Tinker's name of
    /// the projection of all of them (`model.layers.3.mlp.experts.w1`: gate `w1`, up `w3`,
    /// down `w2`), whose `A` and `B` are `[experts, rank, in]` and `[experts, out, rank]`.
    pub fn module_path(&self) -> String {
        match (self.is_experts(), self.layer) {
            (true, Some(i)) => {
                let w = match self.target {
                    Target::Gate => "w1",
                    Target::Up => "w3",
                    _ => "w2",
                };
                format!("model.layers.{i}.mlp.experts.{w}")
            }
            _ => self.target.module_path(self.layer),
        }
    }
}

/// The row layout of a [`LayoutKey`]: every adapted layer in block order, then the LM head.
#[derive(Debug)]
pub struct Layout {
    /// The key.
    pub key: LayoutKey,
    /// Adapted layers in row order.
    pub entries: Vec<Entry>,
    index: HashMap<(Option<usize>, Target), usize>,
    /// Elements per row.
    pub numel: i64,
}

impl Layout {
    /// The layout of `spec` on `config`.
    pub fn new(spec: &LoraSpec, config: &ModelConfig) -> Self {
        let key = LayoutKey::of(spec, config);
        let mut entries = Vec::new();
        let mut offset = 0;
        let slots = (0..config.num_layers as usize)
            .flat_map(|l| Target::BLOCK.map(|t| (Some(l), t)))
            .chain([(None, Target::Unembed)]);
        for (layer, target) in slots {
            if !spec.targets(target) {
                continue;
            }
            let moe = config
                .moe
                .as_ref()
                .filter(|moe| layer.is_some_and(|l| moe.sparse_layers[l]));
            let (out, inp, experts, rank, sparse) = match (moe, target) {
                (Some(moe), Target::Gate | Target::Up | Target::Down) => {
                    let (h, i) = (config.hidden_size, moe.expert_intermediate_size);
                    let (out, inp) = if target == Target::Down {
                        (h, i)
                    } else {
                        (i, h)
                    };
                    let bucket = expert_bucket(expert_rank(key.rank, moe.experts_per_token));
                    (out, inp, moe.num_experts, bucket, true)
                }
                _ => {
                    let (out, inp) = target.dims(config);
                    (out, inp, 1, key.rank, false)
                }
            };
            entries.push(Entry {
                layer,
                target,
                out,
                inp,
                experts,
                sparse,
                rank,
                a_offset: offset,
                b_offset: offset + experts * rank * inp,
            });
            offset += experts * rank * (inp + out);
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.layer, e.target), i))
            .collect();
        Layout {
            key,
            entries,
            index,
            numel: offset,
        }
    }

    /// The entry of `target` in `layer`, when adapted.
    pub fn entry(&self, layer: Option<usize>, target: Target) -> Option<(usize, &Entry)> {
        let layer = if target == Target::Unembed {
            None
        } else {
            layer
        };
        self.index
            .get(&(layer, target))
            .map(|&i| (i, &self.entries[i]))
    }

    /// The most adapters of this layout one [`crate::lora::AdapterStack`] holds. A stack's
    /// expert deltas run as grouped matmuls of one group per member and expert, and libtorch's
    /// CUDA grouped matmul takes at most [`MAX_GROUPS`] groups: a layout adapting `E` experts
    /// stacks `MAX_GROUPS / E` adapters (every model loaded has `E ≤ MAX_GROUPS`). Unbounded
    /// for a layout without experts.
    pub fn stack_capacity(&self) -> usize {
        match self
            .entries
            .iter()
            .filter(|e| e.is_experts())
            .map(|e| e.experts)
            .max()
        {
            Some(experts) => (MAX_GROUPS / experts).max(1) as usize,
            None => usize::MAX,
        }
    }

    /// The rank an adapter of rank `rank` (≤ the bucket rank) has at `entry`: `rank`, or for
    /// experts its expert rank ([`expert_rank`]).
    pub fn rank_at(&self, entry: &Entry, rank: i64) -> i64 {
        if entry.is_experts() {
            expert_rank(rank, self.key.experts[2])
        } else {
            rank
        }
    }

    /// `A` (`[rank, inp]`) and `B` (`[out, rank]`) of `entry` as views of a row `[numel]`, cut
    /// to an adapter of rank `rank` (≤ the bucket rank); for experts `[experts, rank_e, inp]`
    /// and `[experts, out, rank_e]` at its expert rank ([`Layout::rank_at`]).
    pub fn pair_views(&self, row: &Tensor, entry: &Entry, rank: i64) -> Result<(Tensor, Tensor)> {
        let (n, r, used) = (entry.experts, entry.rank, self.rank_at(entry, rank));
        let a = row
            .f_narrow(0, entry.a_offset, n * r * entry.inp)?
            .f_view([n, r, entry.inp])?
            .f_narrow(1, 0, used)?;
        let b = row
            .f_narrow(0, entry.b_offset, n * entry.out * r)?
            .f_view([n, entry.out, r])?
            .f_narrow(2, 0, used)?;
        if entry.is_experts() {
            Ok((a, b))
        } else {
            Ok((a.f_squeeze_dim(0)?, b.f_squeeze_dim(0)?))
        }
    }
}

/// One of a row's four tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The weights.
    Params,
    /// Accumulated gradients.
    Grads,
    /// Adam's first moment.
    ExpAvg,
    /// Adam's second moment.
    ExpAvgSq,
}

/// A slab's tensors (`[capacity, numel]`, f32) and its free rows.
pub struct SlabTensors {
    /// Weights.
    pub params: Tensor,
    /// Accumulated gradients.
    pub grads: Tensor,
    /// First moments.
    pub exp_avg: Tensor,
    /// Second moments.
    pub exp_avg_sq: Tensor,
    free: Vec<i64>,
    capacity: i64,
}

impl SlabTensors {
    /// The tensor of `field`.
    pub fn field(&self, field: Field) -> &Tensor {
        match field {
            Field::Params => &self.params,
            Field::Grads => &self.grads,
            Field::ExpAvg => &self.exp_avg,
            Field::ExpAvgSq => &self.exp_avg_sq,
        }
    }

    fn all(&self) -> [&Tensor; 4] {
        [&self.params, &self.grads, &self.exp_avg, &self.exp_avg_sq]
    }
}

/// Every resident adapter of one layout on one device.
pub struct Slab {
    layout: Arc<Layout>,
    device: Device,
    tensors: Mutex<SlabTensors>,
}

type SlabKey = (LayoutKey, Device);

static SLABS: LazyLock<Mutex<HashMap<SlabKey, Arc<Slab>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slab {
    /// The process-wide slab of `layout` on `device`.
    pub fn of(layout: Layout, device: Device) -> Arc<Slab> {
        let mut slabs = lock(&SLABS);
        slabs
            .entry((layout.key, device))
            .or_insert_with(|| {
                let empty = || Tensor::zeros([0, layout.numel], (Kind::Float, device));
                Arc::new(Slab {
                    device,
                    tensors: Mutex::new(SlabTensors {
                        params: empty(),
                        grads: empty(),
                        exp_avg: empty(),
                        exp_avg_sq: empty(),
                        free: Vec::new(),
                        capacity: 0,
                    }),
                    layout: Arc::new(layout),
                })
            })
            .clone()
    }

    /// The row layout.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The device the rows live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs `f` on the current tensors under the slab's lock (every write goes through here).
    pub fn with<R>(&self, f: impl FnOnce(&mut SlabTensors) -> R) -> R {
        f(&mut lock(&self.tensors))
    }

    /// Takes a free row (growing the slab when none is left), zeroed in all four tensors.
    pub fn allocate(self: &Arc<Self>) -> Result<Row> {
        let index = self.with(|t| -> Result<i64> {
            if t.free.is_empty() {
                let capacity = (t.capacity * 2).max(1);
                let grow = |old: &Tensor| -> Result<Tensor> {
                    let new =
                        Tensor::f_zeros([capacity, self.layout.numel], (Kind::Float, self.device))?;
                    if t.capacity > 0 {
                        new.f_narrow(0, 0, t.capacity)?.f_copy_(old)?;
                    }
                    Ok(new)
                };
                let [p, g, m, v] = t.all().map(grow);
                (t.params, t.grads, t.exp_avg, t.exp_avg_sq) = (p?, g?, m?, v?);
                t.free.extend((t.capacity..capacity).rev());
                t.capacity = capacity;
            }
            let index = t.free.pop().expect("grown above");
            for tensor in t.all() {
                let _ = tensor.f_select(0, index)?.f_zero_()?;
            }
            Ok(index)
        })?;
        Ok(Row {
            slab: self.clone(),
            index,
        })
    }

    /// `values` on the slab's device as f32 (done before taking the lock, so copies from the
    /// host never hold other workers back).
    pub fn convert(&self, values: &Tensor) -> Result<Tensor> {
        Ok(values.f_to_device(self.device)?.f_to_kind(Kind::Float)?)
    }
}

/// One adapter's row in a slab; dropping it frees the row.
pub struct Row {
    slab: Arc<Slab>,
    index: i64,
}

impl Row {
    /// The slab holding the row.
    pub fn slab(&self) -> &Arc<Slab> {
        &self.slab
    }

    /// The row's index in its slab.
    pub fn index(&self) -> i64 {
        self.index
    }

    /// A view of the row of `field` (`[numel]`), for reading by the row's owner.
    pub fn view(&self, field: Field) -> Result<Tensor> {
        self.slab
            .with(|t| Ok(t.field(field).f_select(0, self.index)?))
    }

    /// Overwrites the row of `field` with `values` (`[numel]`, any device and float kind).
    pub fn write(&self, field: Field, values: &Tensor) -> Result<()> {
        let values = self.slab.convert(values)?;
        self.slab.with(|t| -> Result<()> {
            t.field(field).f_select(0, self.index)?.f_copy_(&values)?;
            Ok(())
        })
    }

    /// Zeroes the row of `field`.
    pub fn zero(&self, field: Field) -> Result<()> {
        self.slab.with(|t| -> Result<()> {
            let _ = t.field(field).f_select(0, self.index)?.f_zero_()?;
            Ok(())
        })
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        let index = self.index;
        self.slab.with(|t| t.free.push(index));
    }
}
