//! Key/value cache of a decode batch.
//!
//! Rows are left-padded: row `i` holds valid keys in columns `pad[i]..len` of every layer's
//! `[batch, kv_heads, len, head_dim]` tensors, so all rows append their next token in the same
//! column and batches of different prompt lengths can be merged by padding on the left.

use tch::Tensor;

use crate::error::Result;

/// Cached keys and values of every layer for a batch of sequences.
pub struct KvCache {
    /// `(keys, values)` per layer, each `[batch, kv_heads, len, head_dim]`.
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// Leading padding columns of each row.
    pub(crate) pad: Vec<i64>,
}

impl KvCache {
    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Columns (longest row's length).
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }

    /// Whether the cache holds no columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Position of the next token of each row (its number of real tokens so far).
    pub fn next_positions(&self) -> Vec<i64> {
        let len = self.len();
        self.pad.iter().map(|p| len - p).collect()
    }

    /// Boolean mask `[batch, 1, 1, len + extra]`: which key columns each row may attend to once
    /// `extra` new columns are appended.
    pub(crate) fn key_mask(&self, extra: i64) -> Result<Tensor> {
        let device = self.layers[0].0.device();
        let cols = Tensor::f_arange(self.len() + extra, (tch::Kind::Int64, device))?;
        let pad = Tensor::from_slice(&self.pad)
            .f_to_device(device)?
            .f_unsqueeze(1)?;
        Ok(cols
            .f_unsqueeze(0)?
            .f_ge_tensor(&pad)?
            .f_unsqueeze(1)?
            .f_unsqueeze(1)?)
    }

    /// Repeats row `i` `counts[i]` times, in order (`num_samples` sequences sharing one
    /// prefill).
    pub fn repeat_rows(&self, counts: &[i64]) -> Result<KvCache> {
        let rows: Vec<i64> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(i as i64, n.max(0) as usize))
            .collect();
        self.select(&rows)
    }

    /// A second handle on the same tensors.
    pub fn shallow_clone(&self) -> KvCache {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                .collect(),
            pad: self.pad.clone(),
        }
    }

    /// Drops the leading columns that are padding in every row (after long rows left).
    pub fn trim_padding(&mut self) -> Result<()> {
        let Some(&cut) = self.pad.iter().min() else {
            return Ok(());
        };
        if cut == 0 {
            return Ok(());
        }
        let len = self.len();
        for (k, v) in &mut self.layers {
            *k = k.f_narrow(2, cut, len - cut)?;
            *v = v.f_narrow(2, cut, len - cut)?;
        }
        for p in &mut self.pad {
            *p -= cut;
        }
        Ok(())
    }

    /// Keeps only `rows`, in that order.
    pub fn select(&self, rows: &[i64]) -> Result<KvCache> {
        let device = self.layers[0].0.device();
        let index = Tensor::from_slice(rows).f_to_device(device)?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.f_index_select(0, &index)?, v.f_index_select(0, &index)?)))
            .collect::<Result<_>>()?;
        let pad = rows.iter().map(|&r| self.pad[r as usize]).collect();
        Ok(KvCache { layers, pad })
    }

    /// Stacks caches row-wise, left-padding the shorter ones.
    pub fn concat(caches: Vec<KvCache>) -> Result<KvCache> {
        let len = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let num_layers = caches.first().map_or(0, |c| c.layers.len());
        let mut pad = Vec::new();
        let mut per_layer: Vec<(Vec<Tensor>, Vec<Tensor>)> =
            (0..num_layers).map(|_| (Vec::new(), Vec::new())).collect();
        for cache in caches {
            let extra = len - cache.len();
            pad.extend(cache.pad.iter().map(|p| p + extra));
            for (i, (k, v)) in cache.layers.into_iter().enumerate() {
                per_layer[i].0.push(left_pad(k, extra)?);
                per_layer[i].1.push(left_pad(v, extra)?);
            }
        }
        let layers = per_layer
            .into_iter()
            .map(|(ks, vs)| Ok((Tensor::f_cat(&ks, 0)?, Tensor::f_cat(&vs, 0)?)))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, pad })
    }
}

fn left_pad(t: Tensor, extra: i64) -> Result<Tensor> {
    if extra == 0 {
        return Ok(t);
    }
    let mut shape = t.size();
    shape[2] = extra;
    let zeros = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
    Ok(Tensor::f_cat(&[zeros, t], 2)?)
}
