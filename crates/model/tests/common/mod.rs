//! Helpers shared by the oracle tests: the project's Python and its oracle scripts, tiny
//! checkpoints, adapters perturbed from a seed, training data, tensor comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use std::collections::HashMap;

use loraloom_model::rng::SplitMix64;
use loraloom_model::{Datum, Decoder, Field, LoraAdapter, LoraSpec, LossInputs, ModelConfig};
use tch::{Device, Kind, Tensor};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The venv's Python (`LORALOOM_PYTHON` overrides).
pub fn python() -> PathBuf {
    std::env::var_os("LORALOOM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

/// Runs `tests/oracles/<script>` with `args`; panics with its output if it fails.
pub fn oracle(script: &str, args: &[&str]) {
    let path = repo_root().join("tests/oracles").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run `make test` to set up the venv)",
                python().display()
            )
        });
    assert!(
        out.status.success(),
        "oracle {script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh temporary directory under the target dir (kept small; removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "loraloom-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tensors of a safetensors file by name.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The default model's directory (prepared by `make model`), if present.
pub fn default_model_dir() -> PathBuf {
    std::env::var_os("LORALOOM_DEFAULT_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("data/models/SmolLM2-135M-Instruct"))
}

/// A tiny random llama checkpoint made by the oracle.
pub fn tiny_llama_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    oracle(
        "tiny_models.py",
        &["make", "llama", dir.path().to_str().unwrap()],
    );
    dir
}

/// A tiny random llama checkpoint made by the oracle, and the decoder loaded from it (f32).
pub fn tiny_llama(tag: &str) -> (TempDir, Decoder) {
    let dir = tiny_llama_dir(tag);
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    (dir, decoder)
}

/// The values of an integer tensor.
pub fn vec_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.contiguous().view([-1])).unwrap()
}

/// The values of a float tensor as f32.
pub fn vec_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

/// Adds Gaussian noise of standard deviation `scale` to every adapted layer's A and B, so that
/// B is non-zero and every gradient path is exercised (padding stays zero). The noise comes
/// from `seed` alone (drawn on the host: libtorch's generator is shared by the tests running
/// in parallel), so the same seed gives the same adapter in every run.
pub fn perturb(adapter: &LoraAdapter, seed: i64, scale: f64) {
    let mut rng = SplitMix64::new(seed as u64);
    let mut randn_like = |like: &Tensor| {
        let values: Vec<f32> = (0..like.numel())
            .map(|_| {
                let (u, v) = (1.0 - rng.next_f64(), rng.next_f64());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Tensor::from_slice(&values).view(like.size().as_slice())
    };
    let layers: Vec<_> = adapter
        .layout()
        .entries
        .iter()
        .map(|e| (e.layer, e.target))
        .collect();
    for (layer, target) in layers {
        let pair = adapter.pair(layer, target).unwrap();
        let a = &pair.a + randn_like(&pair.a) * scale;
        let b = &pair.b + randn_like(&pair.b) * scale;
        adapter
            .set_pair(Field::Params, layer, target, &a, &b)
            .unwrap();
    }
}

/// A copy of one of the adapter's slab rows.
pub fn row_of(adapter: &LoraAdapter, field: Field) -> Tensor {
    adapter.row().view(field).unwrap().copy()
}

/// A spec of `rank` targeting every layer LoRA can (alpha 32).
pub fn spec(rank: i64, seed: u64) -> LoraSpec {
    LoraSpec {
        rank,
        alpha: 32.0,
        seed,
        train_attn: true,
        train_mlp: true,
        train_unembed: true,
    }
}

/// `spec` with its targets chosen.
pub fn with_targets(mut s: LoraSpec, attn: bool, mlp: bool, unembed: bool) -> LoraSpec {
    (s.train_attn, s.train_mlp, s.train_unembed) = (attn, mlp, unembed);
    s
}

/// `n` cross-entropy datums of `len` tokens (seeded by `seed`), weights falling along the row.
pub fn train_data(seed: i64, n: usize, len: usize) -> Vec<Datum> {
    (0..n)
        .map(|i| {
            let toks: Vec<i64> = (0..len + 1)
                .map(|j| (seed * 31 + i as i64 * 7 + j as i64 * 13) % 128)
                .collect();
            Datum {
                input_tokens: toks[..len].to_vec(),
                loss_inputs: LossInputs {
                    target_tokens: toks[1..].to_vec(),
                    weights: Some(
                        (0..len)
                            .map(|j| if j == 0 { 0.0 } else { 1.0 / (1 + j) as f32 })
                            .collect(),
                    ),
                    logprobs: None,
                    advantages: None,
                    sequence_ratio_mask: None,
                    recorded: None,
                    targets_per_position: None,
                },
                custom: None,
            }
        })
        .collect()
}

/// A fresh adapter for each spec (`None` = the base model), every adapted layer perturbed
/// (seed `seed + i` for spec `i`) so that every gradient path is exercised.
pub fn perturbed(
    specs: &[Option<LoraSpec>],
    cfg: &ModelConfig,
    seed: i64,
) -> Vec<Option<LoraAdapter>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.clone().map(|s| {
                let a = LoraAdapter::new(s, cfg, Device::Cpu).unwrap();
                perturb(&a, seed + i as i64, 0.05);
                a
            })
        })
        .collect()
}

/// Exact copies of `adapters` (weights only), for running the same batch twice.
pub fn copies(adapters: &[Option<LoraAdapter>], cfg: &ModelConfig) -> Vec<Option<LoraAdapter>> {
    adapters
        .iter()
        .map(|f| {
            f.as_ref().map(|f| {
                let a = LoraAdapter::new(f.spec().clone(), cfg, Device::Cpu).unwrap();
                a.row()
                    .write(Field::Params, &row_of(f, Field::Params))
                    .unwrap();
                a
            })
        })
        .collect()
}

/// The oracle's batch (`lora_oracle.py`'s `input_ids`, `targets`, `weights`, `lengths`) as
/// cross-entropy datums (real positions only).
pub fn datums(expected: &HashMap<String, Tensor>) -> Vec<Datum> {
    let lengths = vec_i64(&expected["lengths"]);
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let row = |name: &str| expected[name].get(i as i64).narrow(0, 0, n);
            Datum {
                input_tokens: vec_i64(&row("input_ids")),
                loss_inputs: LossInputs {
                    target_tokens: vec_i64(&row("targets")),
                    weights: Some(vec_f32(&row("weights"))),
                    logprobs: None,
                    advantages: None,
                    sequence_ratio_mask: None,
                    recorded: None,
                    targets_per_position: None,
                },
                custom: None,
            }
        })
        .collect()
}
