//! Key/value cache of a decode batch, preallocated: a decode step writes its token's keys and
//! values in place, so tokens cost no reallocation and no copy of the cache.
//!
//! Each layer holds `[batch, kv_heads, capacity, head_dim]` buffers; the columns in use are the
//! window `start..start + len`. Rows are left-padded within the window: row `i` holds valid keys
//! in window columns `pad[i]..len`, so all rows append their next token in the same column and
//! batches of different prompt lengths can be merged by padding on the left. When the window
//! reaches the end of the buffers they are reallocated with room for many more tokens (a
//! geometric growth, so a sequence of `n` tokens reallocates `O(log n)` times).

use tch::Tensor;

use crate::error::Result;

/// Fewest free columns a reallocation leaves.
const MIN_HEADROOM: i64 = 64;

/// Cached keys and values of every layer for a batch of sequences.
pub struct KvCache {
    /// `(keys, values)` buffers per layer, each `[batch, kv_heads, capacity, head_dim]`.
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    /// First column of the window in use.
    pub(crate) start: i64,
    /// Columns in use (the longest row's length).
    pub(crate) len: i64,
    /// Leading padding columns of each row, within the window.
    pub(crate) pad: Vec<i64>,
}

impl KvCache {
    /// A cache holding the keys and values of a prefill (`[batch, kv_heads, seq, head_dim]` per
    /// layer, no free columns yet).
    pub(crate) fn from_prefill(layers: Vec<(Tensor, Tensor)>, pad: Vec<i64>) -> KvCache {
        let len = layers.first().map_or(0, |(k, _)| k.size()[2]);
        KvCache {
            layers,
            start: 0,
            len,
            pad,
        }
    }

    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Columns in use (the longest row's length).
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether the cache holds no columns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Columns the buffers hold.
    pub fn capacity(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }

    /// Position of the next token of each row (its number of real tokens so far).
    pub fn next_positions(&self) -> Vec<i64> {
        self.pad.iter().map(|p| self.len - p).collect()
    }

    /// Makes room for `extra` more columns after the window, reallocating the buffers (window
    /// moved to column 0, at least [`MIN_HEADROOM`] and the window's length free) only when they
    /// lack it.
    pub(crate) fn reserve(&mut self, extra: i64) -> Result<()> {
        self.reserve_within(extra, i64::MAX)
    }

    /// [`KvCache::reserve`], with buffers of at most `most` columns (or `len + extra`, if more)
    /// when they are reallocated: the caller knows the window never grows past `most`.
    pub(crate) fn reserve_within(&mut self, extra: i64, most: i64) -> Result<()> {
        if self.start + self.len + extra <= self.capacity() {
            return Ok(());
        }
        // Geometric growth, except straight to `most` when that is at most twice as much (one
        // copy fewer, and no more room than the geometric growth takes ahead).
        let grown = self.len + extra.max(self.len).max(MIN_HEADROOM);
        let most = most.max(self.len + extra);
        let capacity = if most <= 2 * grown { most } else { grown };
        let (start, len) = (self.start, self.len);
        for (k, v) in &mut self.layers {
            *k = moved(k, start, len, 0, capacity)?;
            *v = moved(v, start, len, 0, capacity)?;
        }
        self.start = 0;
        Ok(())
    }

    /// Writes `t` new columns of keys and values (`[batch, kv_heads, t, head_dim]`) of `layer`
    /// after the window (room must be [`KvCache::reserve`]d) and returns that layer's keys and
    /// values over the window plus the new columns (views of the buffers). The window grows by
    /// `t` only in [`KvCache::advance`], once every layer has written.
    pub(crate) fn append(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.size()[2];
        let (kb, vb) = &self.layers[layer];
        let at = self.start + self.len;
        kb.f_narrow(2, at, t)?.f_copy_(k)?;
        vb.f_narrow(2, at, t)?.f_copy_(v)?;
        self.window_and(layer, t)
    }

    /// `layer`'s keys and values over the window plus the `t` columns written after it (views
    /// of the buffers).
    fn window_and(&self, layer: usize, t: i64) -> Result<(Tensor, Tensor)> {
        let (kb, vb) = &self.layers[layer];
        Ok((
            kb.f_narrow(2, self.start, self.len + t)?,
            vb.f_narrow(2, self.start, self.len + t)?,
        ))
    }

    /// [`KvCache::append`] of one decode step's keys and values (`[batch, kv_heads,
    /// head_dim]`, as projected, keys k-normed where the family does) where the keys still need
    /// their rotation (`[batch, head_dim, head_dim]`, see [`crate::rope::Rope::rotation`]): the
    /// rotation's batched matmul writes the keys straight into their cache column, so the step
    /// needs no rotated copy to move there on a GPU (decode is bound by the number of
    /// operations per layer).
    pub(crate) fn append_rotated(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        rotation: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kb, vb) = &self.layers[layer];
        let at = self.start + self.len;
        let mut column = kb.f_select(2, at)?;
        if k.device().is_cuda() {
            let _ = k.f_bmm_out(&column, rotation)?;
        } else {
            // libtorch's CPU bmm into a strided destination takes a slow path (65 us against
            // 8 us for bmm and copy, 64 rows of the tiny model).
            column.f_copy_(&k.f_bmm(rotation)?)?;
        }
        vb.f_select(2, at)?.f_copy_(v)?;
        self.window_and(layer, 1)
    }

    /// [`KvCache::append_rotated`] for a step whose column (`at`, `[1]` on the device: the
    /// window's end, see [`KvCache::next_column`]) is read on the device, so the same kernels serve
    /// every step (a replayed CUDA graph): writes the rotated keys and the values there and
    /// returns `layer`'s whole buffers (the step's mask hides what is not the window).
    pub(crate) fn write_rotated_at(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        rotation: &Tensor,
        at: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kb, vb) = &self.layers[layer];
        let _ = kb
            .shallow_clone()
            .f_index_copy_(2, at, &k.f_bmm(rotation)?.f_unsqueeze(2)?)?;
        let _ = vb
            .shallow_clone()
            .f_index_copy_(2, at, &v.f_unsqueeze(2)?)?;
        Ok((kb.shallow_clone(), vb.shallow_clone()))
    }

    /// The buffer column the next token of every row is written to (after the window).
    pub fn next_column(&self) -> i64 {
        self.start + self.len
    }

    /// The first buffer column each row attends to (its first real token).
    pub fn first_columns(&self) -> Vec<i64> {
        self.pad.iter().map(|p| self.start + p).collect()
    }

    /// Where the buffers live (the first layer's keys): a step recorded over them may replay
    /// only while this and [`KvCache::capacity`] are unchanged.
    pub fn buffer_address(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.data_ptr() as usize)
    }

    /// Handles on every buffer (what a recorded step reads and writes).
    pub(crate) fn buffers(&self) -> Vec<Tensor> {
        self.layers
            .iter()
            .flat_map(|(k, v)| [k.shallow_clone(), v.shallow_clone()])
            .collect()
    }

    /// Grows the window by the `t` columns every layer [`KvCache::append`]ed (or, `t` = 1,
    /// [`KvCache::append_rotated`]).
    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }

    /// A cache of one row: the keys and values of row `row`'s first `n` real tokens, as views
    /// of this cache's buffers (no free columns). Only to be [`KvCache::concat`]enated (copied
    /// into buffers of its own): writing into it would write into this cache.
    pub(crate) fn row_prefix(&self, row: usize, n: i64) -> Result<KvCache> {
        if row >= self.rows() || n < 0 || self.pad[row] + n > self.len {
            return Err(crate::error::ModelError::invalid(
                "prefix",
                format!(
                    "no row {row} with {n} tokens in a cache of {} rows",
                    self.rows()
                ),
            ));
        }
        let (r, first) = (row as i64, self.start + self.pad[row]);
        let view =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_narrow(0, r, 1)?.f_narrow(2, first, n)?) };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((view(k)?, view(v)?)))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            start: 0,
            len: n,
            pad: vec![0],
        })
    }

    /// Adds `pads[i]` padding columns to row `i` (after [`Decoder::extend`] wrote padded
    /// tokens).
    ///
    /// [`Decoder::extend`]: crate::decoder::Decoder::extend
    pub(crate) fn pad_rows(&mut self, pads: &[i64]) {
        for (p, extra) in self.pad.iter_mut().zip(pads) {
            *p += extra;
        }
    }

    /// A second handle on the same buffers.
    pub fn shallow_clone(&self) -> KvCache {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
                .collect(),
            start: self.start,
            len: self.len,
            pad: self.pad.clone(),
        }
    }

    /// The cache of rows `rows` (in that order) in new buffers: leading columns that are
    /// padding in all of them dropped, the old buffers' free columns kept up to `most` columns
    /// in all (or the window, if more; the caller knows the window never grows past `most`).
    pub(crate) fn keep_rows(&self, rows: &[i64], most: i64) -> Result<KvCache> {
        let pad: Vec<i64> = rows.iter().map(|&r| self.pad[r as usize]).collect();
        let cut = pad.iter().copied().min().unwrap_or(0);
        let (start, len) = (self.start + cut, self.len - cut);
        let capacity = (self.capacity() - start).min(most.max(len));
        let device = self.layers[0].0.device();
        let index = Tensor::from_slice(rows).f_to_device(device)?;
        let kept = |t: &Tensor| t.f_narrow(2, start, capacity)?.f_index_select(0, &index);
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((kept(k)?, kept(v)?)))
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            start: 0,
            len,
            pad: pad.iter().map(|p| p - cut).collect(),
        })
    }

    /// Stacks caches row-wise into new buffers, left-padding the shorter windows: each window is
    /// copied once, straight into its place.
    pub fn concat(caches: Vec<KvCache>) -> Result<KvCache> {
        Self::concat_within(caches, 0, i64::MAX)
    }

    /// [`KvCache::concat`] into buffers with at least `room` free columns (those of the roomiest
    /// input, if more), but at most `most` columns in all (or the window and `room`, if more):
    /// the caller knows the window never grows past `most`.
    pub(crate) fn concat_within(caches: Vec<KvCache>, room: i64, most: i64) -> Result<KvCache> {
        let len = caches.iter().map(|c| c.len).max().unwrap_or(0);
        let roomiest = caches
            .iter()
            .map(|c| c.capacity() - c.start - c.len)
            .max()
            .unwrap_or(0)
            .max(room)
            .max(0)
            + len;
        let capacity = roomiest.min(most.max(len + room));
        let rows: i64 = caches.iter().map(|c| c.rows() as i64).sum();
        let Some(first) = caches.first() else {
            return Ok(KvCache::from_prefill(Vec::new(), Vec::new()));
        };
        let buffer = |t: &Tensor| -> Result<Tensor> {
            let mut shape = t.size();
            shape[0] = rows;
            shape[2] = capacity;
            Ok(Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?)
        };
        let layers = first
            .layers
            .iter()
            .map(|(k, v)| Ok((buffer(k)?, buffer(v)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut pad = Vec::with_capacity(rows as usize);
        let mut row = 0;
        for cache in &caches {
            let extra = len - cache.len;
            let n = cache.rows() as i64;
            pad.extend(cache.pad.iter().map(|p| p + extra));
            for ((k, v), (ck, cv)) in layers.iter().zip(&cache.layers) {
                for (dst, src) in [(k, ck), (v, cv)] {
                    dst.f_narrow(0, row, n)?
                        .f_narrow(2, extra, cache.len)?
                        .f_copy_(&src.f_narrow(2, cache.start, cache.len)?)?;
                }
            }
            row += n;
        }
        Ok(KvCache {
            layers,
            start: 0,
            len,
            pad,
        })
    }
}

/// A buffer of `capacity` columns holding `t`'s columns `start..start + len` at column `at`
/// (zeros elsewhere).
fn moved(t: &Tensor, start: i64, len: i64, at: i64, capacity: i64) -> Result<Tensor> {
    let mut shape = t.size();
    shape[2] = capacity;
    let out = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
    out.f_narrow(2, at, len)?
        .f_copy_(&t.f_narrow(2, start, len)?)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A one-layer cache of `rows` rows and `len` columns, no free ones.
    fn cache(rows: i64, len: i64) -> KvCache {
        let k = Tensor::ones([rows, 1, len, 2], (Kind::Float, Device::Cpu));
        KvCache::from_prefill(vec![(k.shallow_clone(), k)], vec![0; rows as usize])
    }

    #[test]
    fn buffers_grow_geometrically_but_never_past_what_the_caller_says_is_needed() {
        let mut c = cache(2, 100);
        c.reserve(1).unwrap();
        assert_eq!(c.capacity(), 200, "twice the window");
        let mut c = cache(2, 100);
        c.reserve_within(1, 1000).unwrap();
        assert_eq!(
            c.capacity(),
            200,
            "twice the window, far from what is needed"
        );
        let mut c = cache(2, 100);
        c.reserve_within(1, 300).unwrap();
        assert_eq!(
            c.capacity(),
            300,
            "what is needed, within twice the doubling"
        );
        let mut c = cache(2, 100);
        c.reserve_within(1, 130).unwrap();
        assert_eq!(c.capacity(), 130, "no more than needed");
        c.advance(30);
        c.reserve_within(1, 130).unwrap();
        assert_eq!(c.capacity(), 131, "the window itself always fits");
        let joined = KvCache::concat_within(vec![c, cache(1, 20)], 0, 140).unwrap();
        assert_eq!(
            (joined.rows(), joined.len(), joined.capacity()),
            (3, 130, 131)
        );
        let roomy = {
            let mut c = cache(1, 100);
            c.reserve(1).unwrap();
            c
        };
        let joined = KvCache::concat_within(vec![roomy, cache(1, 20)], 0, 150).unwrap();
        assert_eq!(joined.capacity(), 150);
        // Room asked for: what a pass after the copy appends.
        let copy = KvCache::concat_within(vec![cache(1, 20)], 7, 1000).unwrap();
        assert_eq!(copy.capacity(), 27);
        // Keeping the short row: the padding before it goes, and the columns beyond `most`.
        let kept = joined.keep_rows(&[1], 40).unwrap();
        assert_eq!((kept.rows(), kept.len(), kept.capacity()), (1, 20, 40));
        assert_eq!(kept.pad, [0]);
        let ones = kept.layers[0].0.narrow(2, 0, 20).sum(Kind::Float);
        assert_eq!(ones.double_value(&[]), 40.0, "its 20 columns x 2 values");
    }
}
