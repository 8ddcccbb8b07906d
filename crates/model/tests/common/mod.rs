//! Helpers shared by the oracle tests: find the project's Python and run an oracle script.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use loraloom_model::{Decoder, Field, LoraAdapter};
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

/// A tiny random llama checkpoint made by the oracle, and the decoder loaded from it.
pub fn tiny_llama(tag: &str) -> (TempDir, Decoder) {
    let dir = TempDir::new(tag);
    oracle(
        "tiny_models.py",
        &["make", "llama", dir.path().to_str().unwrap()],
    );
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

/// Adds Gaussian noise of standard deviation `scale` (seeded) to every adapted layer's A and B,
/// so that B is non-zero and every gradient path is exercised (padding stays zero).
pub fn perturb(adapter: &LoraAdapter, seed: i64, scale: f64) {
    tch::manual_seed(seed);
    let layers: Vec<_> = adapter
        .layout()
        .entries
        .iter()
        .map(|e| (e.layer, e.target))
        .collect();
    for (layer, target) in layers {
        let pair = adapter.pair(layer, target).unwrap();
        let a = &pair.a + pair.a.randn_like() * scale;
        let b = &pair.b + pair.b.randn_like() * scale;
        adapter
            .set_pair(Field::Params, layer, target, &a, &b)
            .unwrap();
    }
}
