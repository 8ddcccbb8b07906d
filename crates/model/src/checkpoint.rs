//! Adapter checkpoints on disk, in PEFT's layout so that `peft.PeftModel.from_pretrained`
//! loads them on the Hugging Face base model.
//!
//! A checkpoint directory holds:
//! - `adapter_model.safetensors`: `base_model.model.<module>.lora_{A,B}.weight`; a mixture's
//!   experts under Tinker's names, `<layer>.mlp.experts.{w1,w3,w2}` (gate, up, down), with
//!   `A` `[experts, rank_e, in]` and `B` `[experts, out, rank_e]` (what tinker-cookbook's
//!   `weights.build_hf_model` merges; peft has no module to load them onto);
//! - `adapter_config.json`: PEFT's LoRA config (`r`, `lora_alpha`, `target_modules`, ...);
//! - `loraloom.json`: what PEFT has no field for (seed, step count);
//! - `optimizer.safetensors` (full state only): `<key>.exp_avg` / `<key>.exp_avg_sq`.
//!
//! Sampler weights are the first three files; a full state adds the optimizer. Directories are
//! written under a temporary name, synced, then renamed into place, so a reader never sees half a
//! checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adam::AdamState;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::{LoraAdapter, LoraSpec, Target};
use crate::slab::Field;
use crate::weights::take_checked;

const ADAPTER_FILE: &str = "adapter_model.safetensors";
const CONFIG_FILE: &str = "adapter_config.json";
const EXTRA_FILE: &str = "loraloom.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The accumulated gradients a run's snapshot holds when they were pending at a graceful
/// shutdown ([`SaveRequest::gradients`]); never part of a checkpoint.
pub const GRADIENTS_FILE: &str = "gradients.safetensors";

#[derive(Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: String,
    r: i64,
    lora_alpha: f64,
    target_modules: Vec<String>,
    lora_dropout: f64,
    bias: String,
    fan_in_fan_out: bool,
    inference_mode: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Extra {
    seed: u64,
    step: Option<i64>,
    /// [`SaveRequest::note`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<serde_json::Value>,
}

fn peft_key(module: &str, half: &str) -> String {
    format!("base_model.model.{module}.lora_{half}.weight")
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::MissingFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// What to write.
pub struct SaveRequest<'a> {
    /// The adapter.
    pub adapter: &'a LoraAdapter,
    /// Its optimizer state, for a full (resumable) checkpoint.
    pub optimizer: Option<&'a AdamState>,
    /// Recorded as `base_model_name_or_path`.
    pub base_model: &'a str,
    /// Also write the adapter's accumulated gradients ([`GRADIENTS_FILE`]), which [`load`]
    /// gives back as pending: a run's snapshot at a graceful shutdown, so that the
    /// `optim_step` after a restart consumes them. Never for a checkpoint.
    pub gradients: bool,
    /// What the caller records with the weights, written atomically with them and read back by
    /// [`read_note`] (the server's journal position of a run's snapshot); opaque here.
    pub note: Option<serde_json::Value>,
}

/// The [`SaveRequest::note`] of the checkpoint in `dir`; `None` when it has none or cannot be
/// read.
pub fn read_note(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(EXTRA_FILE)).ok()?;
    serde_json::from_str::<Extra>(&text).ok()?.note
}

/// Writes a checkpoint atomically into `dir` (replacing an older one of the same name), durable
/// when this returns.
pub fn save(request: &SaveRequest, dir: &Path) -> Result<()> {
    let staged = stage(request, dir, Durability::EachFile)?;
    let parent = staged.parent.clone();
    staged.commit()?;
    File::open(&parent)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&parent, e))
}

/// Writes many checkpoints atomically, durable when this returns: all files are written first,
/// made durable with one flush of their filesystem, then every checkpoint is moved into place
/// and the renames are flushed once more. Two flushes in all, instead of a few `fsync`s per
/// checkpoint (what one fused optimizer step of many runs would otherwise pay before it can
/// acknowledge any of them). One outcome per request, in order.
pub fn save_all(requests: &[(SaveRequest, &Path)]) -> Vec<Result<()>> {
    let staged: Vec<Result<Staged>> = requests
        .iter()
        .map(|(request, dir)| stage(request, dir, Durability::Later))
        .collect();
    let parents: Vec<PathBuf> = staged.iter().flatten().map(|s| s.parent.clone()).collect();
    if let Err(e) = flush(&parents) {
        return staged
            .into_iter()
            .map(|s| {
                let s = s?;
                let _ = std::fs::remove_dir_all(&s.tmp);
                Err(ModelError::Io(std::io::Error::new(e.kind(), e.to_string())))
            })
            .collect();
    }
    let committed: Vec<Result<()>> = staged.into_iter().map(|s| s?.commit()).collect();
    match flush(&parents) {
        Ok(()) => committed,
        Err(e) => committed
            .into_iter()
            .map(|c| {
                c.and(Err(ModelError::Io(std::io::Error::new(
                    e.kind(),
                    e.to_string(),
                ))))
            })
            .collect(),
    }
}

/// Makes everything written to the filesystems of `dirs` durable: one `syncfs` per distinct
/// directory (all of loraloom's snapshots share one).
fn flush(dirs: &[PathBuf]) -> std::io::Result<()> {
    let mut seen: Vec<&PathBuf> = Vec::new();
    for dir in dirs {
        if seen.contains(&dir) {
            continue;
        }
        seen.push(dir);
        let f = File::open(dir)?;
        rustix::fs::syncfs(&f)?;
    }
    Ok(())
}

/// When the files of a checkpoint are made durable.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// `fsync` each file and the directory as it is written.
    EachFile,
    /// The caller flushes the filesystem afterwards.
    Later,
}

/// A checkpoint written to a temporary sibling of `dir`, not yet in place.
struct Staged {
    tmp: PathBuf,
    dir: PathBuf,
    parent: PathBuf,
}

fn stage(request: &SaveRequest, dir: &Path, sync: Durability) -> Result<Staged> {
    let parent = dir
        .parent()
        .ok_or_else(|| ModelError::invalid("path", format!("{} has no parent", dir.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let tmp = unique_sibling(dir, "tmp");
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    if let Err(e) = write_files(request, &tmp, sync) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(Staged {
        tmp,
        dir: dir.to_path_buf(),
        parent: parent.to_path_buf(),
    })
}

impl Staged {
    /// Moves the checkpoint into place (the renames are durable once the parent is flushed).
    fn commit(self) -> Result<()> {
        let Staged { tmp, dir, .. } = self;
        if dir.exists() {
            let old = unique_sibling(&dir, "old");
            std::fs::rename(&dir, &old).map_err(|e| io(&dir, e))?;
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        }
        Ok(())
    }
}

/// This process among every process that has used the data directory: its id and the time it
/// first staged a save (`PIDxNANOS`). The id alone is not enough: a server restarted in a
/// container often gets the dead one's id back, and would take that one's unfinished saves for
/// its own saves in flight, leaving a run's snapshot missing.
fn process_tag() -> &'static str {
    static TAG: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("{}x{}", std::process::id(), unix_nanos()));
    &TAG
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Undoes a replacement that [`save`] did not finish: between its two renames `dir` is absent and
/// the previous version waits in a `.NAME.old-TAG-NANOS` sibling. Renames the newest such
/// sibling of another process (one that died mid-save) back; this process's own siblings
/// ([`process_tag`]) belong to a save still in flight. Does nothing when `dir` exists or no
/// sibling does.
pub fn recover(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(());
    };
    let prefix = format!(".{}.old-", name.to_string_lossy());
    let ours = format!("{prefix}{}-", process_tag());
    let Ok(siblings) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    let newest = siblings
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && !n.starts_with(&ours))
        .max_by_key(|n| {
            n.rsplit('-')
                .next()
                .and_then(|nanos| nanos.parse::<u128>().ok())
                .unwrap_or(0)
        });
    if let Some(old) = newest {
        std::fs::rename(parent.join(&old), dir).map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// A sibling of `dir` for this process to stage in (`tag` `tmp`) or to keep the previous
/// version in (`old`) while it replaces `dir`: `.NAME.TAG-PROCESS-NANOS`, which a restart
/// recognises as another process's ([`remove_stale`]).
pub fn unique_sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.{tag}-{}-{}", process_tag(), unix_nanos()))
}

fn write_files(request: &SaveRequest, dir: &Path, sync: Durability) -> Result<()> {
    let adapter = request.adapter;
    let spec = adapter.spec();
    let pairs = adapter.named_pairs();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(pairs.len() * 2);
    for (module, pair) in &pairs {
        tensors.push((peft_key(module, "A"), cpu_f32(&pair.a)?));
        tensors.push((peft_key(module, "B"), cpu_f32(&pair.b)?));
    }
    write_safetensors(&tensors, &dir.join(ADAPTER_FILE), sync)?;
    let target_modules = Target::ALL
        .into_iter()
        .filter(|t| spec.targets(*t))
        .map(|t| t.hf_name().to_string())
        .collect();
    let config = PeftConfig {
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        r: spec.rank,
        lora_alpha: spec.alpha,
        target_modules,
        lora_dropout: 0.0,
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        base_model_name_or_path: Some(request.base_model.to_string()),
    };
    write_json(&dir.join(CONFIG_FILE), &config, sync)?;
    let extra = Extra {
        seed: spec.seed,
        step: request.optimizer.map(|o| o.step),
        note: request.note.clone(),
    };
    write_json(&dir.join(EXTRA_FILE), &extra, sync)?;
    if request.optimizer.is_some() {
        let mut moments = field_tensors(adapter, Field::ExpAvg, ".exp_avg")?;
        moments.extend(field_tensors(adapter, Field::ExpAvgSq, ".exp_avg_sq")?);
        write_safetensors(&moments, &dir.join(OPTIMIZER_FILE), sync)?;
    }
    if request.gradients {
        let grads = field_tensors(adapter, Field::Grads, ".grad")?;
        write_safetensors(&grads, &dir.join(GRADIENTS_FILE), sync)?;
    }
    sync_path(dir, sync)
}

/// `adapter`'s `field` as safetensors entries, each named by its peft key and `suffix` (what
/// [`load`] reads back with the same suffix), in f32 on the CPU.
fn field_tensors(
    adapter: &LoraAdapter,
    field: Field,
    suffix: &str,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for (module, pair) in adapter.named_field_pairs(field)? {
        tensors.push((
            format!("{}{suffix}", peft_key(&module, "A")),
            cpu_f32(&pair.a)?,
        ));
        tensors.push((
            format!("{}{suffix}", peft_key(&module, "B")),
            cpu_f32(&pair.b)?,
        ));
    }
    Ok(tensors)
}

/// `fsync`s `path` (a file or directory) when each file is made durable as it is written.
fn sync_path(path: &Path, sync: Durability) -> Result<()> {
    if sync == Durability::Later {
        return Ok(());
    }
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Every tensor of a safetensors file by name.
fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .map_err(|e| io(path, std::io::Error::other(e.to_string())))?
        .into_iter()
        .collect())
}

fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?)
}

fn write_safetensors(tensors: &[(String, Tensor)], path: &Path, sync: Durability) -> Result<()> {
    Tensor::write_safetensors(tensors, path)?;
    sync_path(path, sync)
}

fn write_json<T: Serialize>(path: &Path, value: &T, sync: Durability) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::Config(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| io(path, e))?;
    sync_path(path, sync)
}

/// A checkpoint read back from disk.
pub struct Loaded {
    /// The adapter with the saved weights.
    pub adapter: LoraAdapter,
    /// The optimizer state, when the checkpoint is a full state.
    pub optimizer: Option<AdamState>,
}

/// Reads a checkpoint written by [`save`] or by `peft`'s `save_pretrained` for `config`'s model
/// (with the gradients it holds, if any, pending in the adapter).
pub fn load(dir: &Path, config: &ModelConfig, device: Device) -> Result<Loaded> {
    recover(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
    let peft: PeftConfig = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", config_path.display())))?;
    if peft.peft_type != "LORA" {
        return Err(ModelError::Config(format!(
            "{}: peft_type {} is not LORA",
            config_path.display(),
            peft.peft_type
        )));
    }
    let extra: Option<Extra> = std::fs::read_to_string(dir.join(EXTRA_FILE))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let has = |names: &[&str]| {
        names
            .iter()
            .all(|n| peft.target_modules.iter().any(|m| m == n))
    };
    let any = |names: &[&str]| {
        names
            .iter()
            .any(|n| peft.target_modules.iter().any(|m| m == n))
    };
    let attn = ["q_proj", "k_proj", "v_proj", "o_proj"];
    let mlp = ["gate_proj", "up_proj", "down_proj"];
    if (any(&attn) && !has(&attn)) || (any(&mlp) && !has(&mlp)) {
        return Err(ModelError::Config(format!(
            "{}: target_modules {:?} adapt part of a group; loraloom adapts all of q/k/v/o or all of gate/up/down",
            config_path.display(),
            peft.target_modules
        )));
    }
    let spec = LoraSpec {
        rank: peft.r,
        alpha: peft.lora_alpha,
        seed: extra.as_ref().map_or(0, |e| e.seed),
        train_attn: has(&attn),
        train_mlp: has(&mlp),
        train_unembed: any(&["lm_head"]),
    };
    let adapter = LoraAdapter::zeroed(spec, config, device)?;
    let weights_path = dir.join(ADAPTER_FILE);
    let mut tensors = read_tensors(&weights_path)?;
    let rank = adapter.spec().rank;
    let layout = adapter.layout().clone();
    let read = |tensors: &mut HashMap<String, Tensor>, field: Field, suffix: &str| {
        for e in &layout.entries {
            let module = e.module_path();
            let key = |half| format!("{}{suffix}", peft_key(&module, half));
            let r = layout.rank_at(e, rank);
            let (a_shape, b_shape) = if e.is_experts() {
                (vec![e.experts, r, e.inp], vec![e.experts, e.out, r])
            } else {
                (vec![r, e.inp], vec![e.out, r])
            };
            let a = take_checked(tensors, &key("A"), &a_shape)?;
            let b = take_checked(tensors, &key("B"), &b_shape)?;
            adapter.set_pair(field, e.layer, e.target, &a, &b)?;
        }
        Ok::<(), ModelError>(())
    };
    read(&mut tensors, Field::Params, "")?;
    let optimizer = if dir.join(OPTIMIZER_FILE).exists() {
        let mut moments = read_tensors(&dir.join(OPTIMIZER_FILE))?;
        read(&mut moments, Field::ExpAvg, ".exp_avg")?;
        read(&mut moments, Field::ExpAvgSq, ".exp_avg_sq")?;
        Some(AdamState {
            step: extra.as_ref().and_then(|e| e.step).unwrap_or(0),
        })
    } else {
        None
    };
    if dir.join(GRADIENTS_FILE).exists() {
        let mut grads = read_tensors(&dir.join(GRADIENTS_FILE))?;
        read(&mut grads, Field::Grads, ".grad")?;
        adapter.set_pending_flag();
    }
    Ok(Loaded { adapter, optimizer })
}

/// What saves of other processes (which died mid-save) left under `root`, tidied at start:
/// each staging directory (`.NAME.tmp-TAG-NANOS`) is removed; a previous version
/// (`.NAME.old-TAG-NANOS`) is first renamed back when `NAME` is missing ([`recover`]), and the
/// others are removed once `NAME` exists. This process's own siblings (saves in flight) are
/// left alone. Walks at most `depth` levels; returns how many directories were removed.
pub fn remove_stale(root: &Path, depth: usize) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(0);
    };
    let ours = format!("-{}-", process_tag());
    let mut removed = 0;
    let mut subdirs = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let staged = file_name.strip_prefix('.').and_then(|rest| {
            [".tmp", ".old"].into_iter().find_map(|tag| {
                let at = rest.rfind(&format!("{tag}-"))?;
                let suffix = &rest[at + tag.len()..];
                Some((&rest[..at], tag, suffix))
            })
        });
        match staged {
            Some((_, _, suffix)) if suffix.starts_with(&ours) => {}
            Some((name, tag, _)) => {
                let dir = root.join(name);
                if tag == ".old" {
                    recover(&dir)?;
                }
                let path = entry.path();
                if path.exists() && (tag == ".tmp" || dir.exists()) {
                    std::fs::remove_dir_all(&path).map_err(|e| io(&path, e))?;
                    removed += 1;
                }
            }
            None if depth > 0 => subdirs.push(entry.path()),
            None => {}
        }
    }
    for dir in subdirs {
        removed += remove_stale(&dir, depth - 1)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::{process_tag, recover, remove_stale};

    #[test]
    fn stale_staging_and_old_versions_are_tidied_and_in_flight_ones_kept() {
        let root = std::env::temp_dir().join(format!("loraloom-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let run = root.join("checkpoints").join("ab").join("cd");
        let make = |name: &str| {
            let d = run.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("which"), name).unwrap();
        };
        make("kept");
        make(".kept.old-1-5"); // NAME exists: removed
        make(".gone.old-1-5"); // NAME missing: renamed back to `gone`
        make(".half.tmp-1-9"); // a dead save's staging: removed
        let in_flight = format!(".busy.tmp-{}-3", process_tag());
        make(&in_flight); // this process's save in flight: kept
        let reused = format!(".reused.tmp-{}-4", std::process::id());
        make(&reused); // a dead process whose id this one got back (a restarted container): removed
        assert_eq!(remove_stale(&root, 4).unwrap(), 3);
        let names: std::collections::BTreeSet<String> = std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let want: std::collections::BTreeSet<String> = ["kept", "gone", in_flight.as_str()]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(names, want);
        assert_eq!(
            std::fs::read_to_string(run.join("gone").join("which")).unwrap(),
            ".gone.old-1-5"
        );
        // Too shallow a walk reaches nothing.
        make(".late.tmp-1-1");
        assert_eq!(remove_stale(&root, 1).unwrap(), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn recover_restores_a_dead_process_save_and_leaves_in_flight_ones() {
        let root = std::env::temp_dir().join(format!("loraloom-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("snap");
        // A save of another (dead) process stopped between its renames: two old versions.
        for (nanos, tag) in [(5, "older"), (9, "newer")] {
            let old = root.join(format!(".snap.old-1-{nanos}"));
            std::fs::create_dir_all(&old).unwrap();
            std::fs::write(old.join("which"), tag).unwrap();
        }
        recover(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("which")).unwrap(), "newer");
        // This process's own sibling is a save in flight: not touched.
        std::fs::remove_dir_all(&dir).unwrap();
        let ours = root.join(format!(".snap.old-{}-7", process_tag()));
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::remove_dir_all(root.join(".snap.old-1-5")).unwrap();
        recover(&dir).unwrap();
        assert!(ours.exists() && !dir.exists());
        // A dead process with this process's id (a restart in a container reuses it): restored.
        std::fs::remove_dir_all(&ours).unwrap();
        let reused = root.join(format!(".snap.old-{}-8", std::process::id()));
        std::fs::create_dir_all(&reused).unwrap();
        recover(&dir).unwrap();
        assert!(dir.exists() && !reused.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
