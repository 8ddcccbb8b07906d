//! Reading a checkpoint's safetensors files (single file or sharded with an index).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};

/// The tensors of a checkpoint by name, taken one by one with shape checks.
pub struct WeightStore {
    tensors: HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
    /// Whether MXFP4 weights stay packed on the device ([`WeightStore::keep_mxfp4_packed`]).
    mxfp4_packed: bool,
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::MissingFile {
            path: index.clone(),
            reason: e.to_string(),
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::Config(format!("{}: no `weight_map` object", index.display()))
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::MissingFile {
        path: single,
        reason: "neither model.safetensors nor model.safetensors.index.json exists".into(),
    })
}

impl WeightStore {
    /// Loads every tensor of the checkpoint in `dir`, converted to `kind` on `device`.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in safetensors_files(dir)? {
            if !file.exists() {
                return Err(ModelError::MissingFile {
                    path: file,
                    reason: "listed in the index but absent".into(),
                });
            }
            let read = Tensor::read_safetensors(&file).map_err(|e| ModelError::MissingFile {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            tensors.extend(read);
        }
        Ok(WeightStore {
            tensors,
            kind,
            device,
            mxfp4_packed: false,
        })
    }

    /// Bytes the checkpoint's MXFP4 weights (`…_blocks`, two values a byte) take dequantized
    /// into the store's element type.
    pub fn mxfp4_dequantized_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|(name, _)| name.ends_with("_blocks"))
            .map(|(_, t)| t.numel() as u64 * 2 * self.kind.elt_size_in_bytes() as u64)
            .sum()
    }

    /// Keeps MXFP4 weights packed on the device (`true`) or dequantizes them at load.
    pub fn keep_mxfp4_packed(&mut self, packed: bool) {
        self.mxfp4_packed = packed;
    }

    /// Whether MXFP4 weights stay packed ([`WeightStore::keep_mxfp4_packed`]).
    pub fn keeps_mxfp4_packed(&self) -> bool {
        self.mxfp4_packed
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes `name` from the store, checking its shape; the result is frozen (no grad).
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.take_as(name, shape, self.kind)
    }

    /// [`WeightStore::take`] in element type `kind` rather than the store's.
    pub fn take_as(&mut self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let tensor = take_checked(&mut self.tensors, name, shape)?;
        self.place_as(tensor, kind)
    }

    /// Removes `name` from the store as the checkpoint holds it (element type and device
    /// unchanged: packed formats the caller decodes), checking its shape.
    pub fn take_raw(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        take_checked(&mut self.tensors, name, shape)
    }

    /// A weight the caller decoded (from [`WeightStore::take_raw`]) as [`WeightStore::take`]
    /// returns weights: in the store's element type, on its device, frozen.
    pub fn place(&self, tensor: Tensor) -> Result<Tensor> {
        self.place_as(tensor, self.kind)
    }

    /// `tensor` in `kind` on the store's device, frozen.
    pub(crate) fn place_as(&self, tensor: Tensor, kind: Kind) -> Result<Tensor> {
        Ok(tensor
            .f_to_kind(kind)?
            .f_to_device(self.device)?
            .set_requires_grad(false))
    }

    /// The element type weights are converted to.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Like [`WeightStore::take`] but `None` when absent.
    pub fn take_optional(&mut self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names not consumed by the architecture (reported, not fatal).
    pub fn leftover(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// Removes tensor `name` from `tensors`, checking its shape (missing and misshapen tensors are
/// named errors).
pub(crate) fn take_checked(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[i64],
) -> Result<Tensor> {
    let tensor = tensors
        .remove(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if tensor.size() != shape {
        return Err(ModelError::WrongShape {
            name: name.to_string(),
            found: tensor.size(),
            expected: shape.to_vec(),
        });
    }
    Ok(tensor)
}
