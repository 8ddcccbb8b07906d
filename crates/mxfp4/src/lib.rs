//! MXFP4 weights kept packed where the model runs, for checkpoints that ship them (OpenAI's
//! GPT-OSS experts): 4.25 bits per weight instead of 16, so gpt-oss-120b's experts take
//! ~61 GB of a GPU instead of ~230 GB in bf16.
//!
//! [`PackedWeights`] holds one projection of every expert as its checkpoint stores it: `blocks`
//! `[E, out, G, 16]` bytes, each two E2M1 values (the low nibble first), and `scales`
//! `[E, out, G]`, the power of two `2^(scale − 127)` that each 32 values of a row share. A
//! multiplication dequantizes the weights it needs into the compute type, multiplies, and drops
//! them. Its backward pass (the gradient of the input; the weights are frozen) dequantizes
//! again: autograd keeps only the packed weights, which stay resident anyway, where a
//! multiplication by dequantized weights would keep every layer's until the backward pass.
//!
//! The autograd functions are C++ (`src/mxfp4.cpp`, over ATen): tch cannot define one.

use std::ffi::{c_char, CStr};

use tch::{Device, Kind, Tensor};

/// Why an MXFP4 operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Mxfp4Error {
    /// Shapes or types that are not MXFP4 weights (the message says which).
    #[error("MXFP4: {0}")]
    Shape(String),
    /// libtorch refused (its message).
    #[error("MXFP4: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Mxfp4Error {
    fn from(e: tch::TchError) -> Self {
        Mxfp4Error::Torch(e.to_string())
    }
}

/// Packed bytes dequantized at a time (whole experts, at least one): bounds the temporaries of
/// a dequantization to 4 bytes of indices and two values per byte.
const CHUNK_BYTES: i64 = 1 << 24;

/// The sixteen E2M1 values by nibble.
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// One projection of every expert, packed: see the crate's documentation.
pub struct PackedWeights {
    /// `[E, out, G, 16]`, uint8.
    blocks: Tensor,
    /// `[E, out, G]`, uint8.
    scales: Tensor,
    /// `[256, 2]`: each byte's two values in the compute type, on the weights' device.
    table: Tensor,
}

impl PackedWeights {
    /// The weights of `blocks` `[E, out, G, 16]` and `scales` `[E, out, G]` (uint8, on one
    /// device), dequantized into `kind`: f32 or bf16, which hold every E2M1 value times every
    /// power of two a scale gives (f16 does not).
    pub fn new(blocks: Tensor, scales: Tensor, kind: Kind) -> Result<Self, Mxfp4Error> {
        if !matches!(kind, Kind::Float | Kind::BFloat16) {
            return Err(Mxfp4Error::Shape(format!(
                "dequantizes into f32 or bf16, not {kind:?}"
            )));
        }
        let b = blocks.size();
        let s = scales.size();
        if b.len() != 4 || b[3] != 16 || s != b[..3] {
            return Err(Mxfp4Error::Shape(format!(
                "blocks must be [E, out, G, 16] and scales [E, out, G], got {b:?} and {s:?}"
            )));
        }
        if blocks.kind() != Kind::Uint8 || scales.kind() != Kind::Uint8 {
            return Err(Mxfp4Error::Shape(format!(
                "blocks and scales must be uint8, got {:?} and {:?}",
                blocks.kind(),
                scales.kind()
            )));
        }
        if blocks.device() != scales.device() {
            return Err(Mxfp4Error::Shape(
                "blocks and scales are on different devices".into(),
            ));
        }
        let pairs: Vec<f32> = (0..256)
            .flat_map(|byte| [E2M1[byte & 0x0F], E2M1[byte >> 4]])
            .collect();
        let table = Tensor::from_slice(&pairs)
            .f_view([256, 2])?
            .f_to_device(blocks.device())?
            .f_to_kind(kind)?;
        Ok(PackedWeights {
            blocks,
            scales,
            table,
        })
    }

    /// A handle on the same storage.
    pub fn shallow_clone(&self) -> Self {
        PackedWeights {
            blocks: self.blocks.shallow_clone(),
            scales: self.scales.shallow_clone(),
            table: self.table.shallow_clone(),
        }
    }

    /// `[E, out, in]`: experts, output and input widths.
    pub fn shape(&self) -> [i64; 3] {
        let b = self.blocks.size();
        [b[0], b[1], b[2] * 32]
    }

    /// The type multiplications compute in.
    pub fn kind(&self) -> Kind {
        self.table.kind()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.blocks.device()
    }

    /// Bytes held (blocks and scales).
    pub fn bytes(&self) -> u64 {
        (self.blocks.numel() + self.scales.numel()) as u64
    }

    /// Bytes a product holds at its peak besides its input and output: every expert's weights
    /// in the compute type (the gathered product: at most one fewer expert's, plus the copies
    /// of their blocks and scales it dequantizes from) and one chunk's temporaries.
    pub fn working_bytes(&self) -> u64 {
        let elem = self.kind().elt_size_in_bytes() as u64;
        let values = self.shape().iter().product::<i64>() as u64;
        let packed = values / 2;
        let chunk = (CHUNK_BYTES as u64)
            .max(packed / self.shape()[0].max(1) as u64)
            .min(packed);
        values * elem + self.bytes() + chunk * (4 + 2 * elem)
    }

    /// Every expert's weights, `[E, out, in]` in the compute type.
    pub fn dequantize(&self) -> Result<Tensor, Mxfp4Error> {
        let mut out = std::ptr::null_mut();
        // SAFETY: the three handles are live tch tensors for the duration of the call (borrowed
        // from `self`); the glue only reads them and, on success, stores a new tensor handle
        // in `out`, which `take` wraps exactly once.
        let error = unsafe {
            ffi::loraloom_mxfp4_dequantize(
                self.blocks.as_ptr(),
                self.scales.as_ptr(),
                self.table.as_ptr(),
                CHUNK_BYTES,
                &mut out,
            )
        };
        take(error, out)
    }

    /// `x` `[rows, in]` times each expert's weights (transposed): expert `e` multiplies the run
    /// of rows that ends at `offsets[e]` (int32, cumulative, as `_grouped_mm` takes them).
    /// Dequantizes every expert, forward and backward.
    pub fn grouped_mm(&self, x: &Tensor, offsets: &Tensor) -> Result<Tensor, Mxfp4Error> {
        self.product(ffi::loraloom_mxfp4_grouped_mm, x, offsets)
    }

    /// `x` `[P, in]`, row `p` times the weights of expert `experts[p]` (int64) (transposed).
    /// Dequantizes one expert per row, forward and backward: cheaper than [`Self::grouped_mm`]
    /// while rows are fewer than experts (a decode step).
    pub fn gathered_mm(&self, x: &Tensor, experts: &Tensor) -> Result<Tensor, Mxfp4Error> {
        self.product(ffi::loraloom_mxfp4_gathered_mm, x, experts)
    }

    /// `x` times the weights by `glue`, which `rows` tells which expert each row meets.
    fn product(&self, glue: ffi::Product, x: &Tensor, rows: &Tensor) -> Result<Tensor, Mxfp4Error> {
        self.check_input(x)?;
        let mut out = std::ptr::null_mut();
        // SAFETY: as in `dequantize` (`x` and `rows` are borrowed for the call too); the
        // autograd node the call records holds its own references to the tensors it saves.
        let error = unsafe {
            glue(
                x.as_ptr(),
                self.blocks.as_ptr(),
                self.scales.as_ptr(),
                self.table.as_ptr(),
                rows.as_ptr(),
                CHUNK_BYTES,
                &mut out,
            )
        };
        take(error, out)
    }

    fn check_input(&self, x: &Tensor) -> Result<(), Mxfp4Error> {
        let [_, _, inp] = self.shape();
        let size = x.size();
        if size.len() != 2 || size[1] != inp || x.kind() != self.kind() {
            return Err(Mxfp4Error::Shape(format!(
                "input must be [rows, {inp}] of {:?}, got {size:?} of {:?}",
                self.kind(),
                x.kind()
            )));
        }
        Ok(())
    }
}

/// The glue's result: its error message, or the tensor it made.
fn take(error: *mut c_char, out: *mut torch_sys::C_tensor) -> Result<Tensor, Mxfp4Error> {
    if !error.is_null() {
        // SAFETY: a non-null error is a NUL-terminated string the glue malloc'd and hands
        // over; it is read once and freed once, by the glue's own free.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above.
        unsafe { ffi::loraloom_mxfp4_error_free(error) };
        return Err(Mxfp4Error::Torch(text));
    }
    if out.is_null() {
        return Err(Mxfp4Error::Torch("the glue returned no tensor".into()));
    }
    // SAFETY: on success the glue stored a tensor handle it new'd (`new at::Tensor`), which
    // tch's `Tensor` owns from here and frees once on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

mod ffi {
    use std::ffi::c_char;

    use torch_sys::C_tensor;

    /// A product's glue: input, blocks, scales, table, which rows meet which expert, chunk,
    /// out.
    pub type Product = unsafe extern "C" fn(
        *const C_tensor,
        *const C_tensor,
        *const C_tensor,
        *const C_tensor,
        *const C_tensor,
        i64,
        *mut *mut C_tensor,
    ) -> *mut c_char;

    extern "C" {
        pub fn loraloom_mxfp4_error_free(error: *mut c_char);
        pub fn loraloom_mxfp4_dequantize(
            blocks: *const C_tensor,
            scales: *const C_tensor,
            table: *const C_tensor,
            chunk: i64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn loraloom_mxfp4_grouped_mm(
            x: *const C_tensor,
            blocks: *const C_tensor,
            scales: *const C_tensor,
            table: *const C_tensor,
            offsets: *const C_tensor,
            chunk: i64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
        pub fn loraloom_mxfp4_gathered_mm(
            x: *const C_tensor,
            blocks: *const C_tensor,
            scales: *const C_tensor,
            table: *const C_tensor,
            experts: *const C_tensor,
            chunk: i64,
            out: *mut *mut C_tensor,
        ) -> *mut c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random packed weights of `[e, out, 32·g]` with scales around 2^0 (the reference's
    /// dequantization is written out here, value by value).
    fn random(e: i64, out: i64, g: i64, seed: i64) -> (PackedWeights, Tensor) {
        tch::manual_seed(seed);
        let blocks = Tensor::randint(256, [e, out, g, 16], (Kind::Uint8, Device::Cpu));
        let scales = Tensor::randint_low(120, 132, [e, out, g], (Kind::Uint8, Device::Cpu));
        let b: Vec<u8> = Vec::try_from(blocks.flatten(0, -1)).unwrap();
        let s: Vec<u8> = Vec::try_from(scales.flatten(0, -1)).unwrap();
        let mut dense = Vec::with_capacity(b.len() * 2);
        for (i, byte) in b.iter().enumerate() {
            let power = 2f32.powi(s[i / 16] as i32 - 127);
            dense.push(E2M1[(byte & 0x0F) as usize] * power);
            dense.push(E2M1[(byte >> 4) as usize] * power);
        }
        let dense = Tensor::from_slice(&dense).view([e, out, g * 32]);
        (
            PackedWeights::new(blocks, scales, Kind::Float).unwrap(),
            dense,
        )
    }

    #[test]
    fn dequantizes_as_the_format_says() {
        let (packed, dense) = random(3, 8, 2, 0);
        assert_eq!(packed.shape(), [3, 8, 64]);
        assert_eq!(packed.bytes(), 3 * 8 * 2 * 17);
        let got = packed.dequantize().unwrap();
        assert_eq!(got.size(), dense.size());
        assert!(got.equal(&dense));
        // bf16 holds E2M1 values times powers of two exactly.
        let bf16 = PackedWeights::new(
            packed.blocks.shallow_clone(),
            packed.scales.shallow_clone(),
            Kind::BFloat16,
        )
        .unwrap();
        assert!(bf16
            .dequantize()
            .unwrap()
            .to_kind(Kind::Float)
            .equal(&dense));
    }

    /// The gradient of `sum(y * g)` for `y` = `f(x)`, with `x` a leaf.
    fn value_and_grad(x: &Tensor, g: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
        let x = x.detach().set_requires_grad(true);
        let y = f(&x);
        (y.shallow_clone() * g).sum(Kind::Float).backward();
        (y.detach(), x.grad())
    }

    fn assert_close(a: &Tensor, b: &Tensor) {
        let diff = (a - b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]).max(1.0);
        assert!(diff <= 1e-5 * scale, "differ by {diff} (scale {scale})");
    }

    /// `x`'s rows, grouped by `offsets`, times their experts' `dense` weights `[N, out, in]`: what
    /// the packed products compute.
    fn dense_product(x: &Tensor, dense: &Tensor, offsets: &Tensor) -> Tensor {
        x.internal_grouped_mm(&dense.transpose(1, 2), Some(offsets), None::<&Tensor>, None)
    }

    #[test]
    fn grouped_and_gathered_products_and_their_gradients_match_dense_weights() {
        let (packed, dense) = random(4, 8, 1, 1);
        let x = Tensor::randn([7, 32], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([7, 8], (Kind::Float, Device::Cpu));
        // Rows 0-1 to expert 0, none to 1, 2-5 to 2, 6 to 3.
        let experts = Tensor::from_slice(&[0i64, 0, 2, 2, 2, 2, 3]);
        let offsets = Tensor::from_slice(&[2i32, 2, 6, 7]);
        let (want, want_grad) = value_and_grad(&x, &g, |x| dense_product(x, &dense, &offsets));
        let (got, got_grad) = value_and_grad(&x, &g, |x| packed.grouped_mm(x, &offsets).unwrap());
        assert_close(&got, &want);
        assert_close(&got_grad, &want_grad);
        let (got, got_grad) = value_and_grad(&x, &g, |x| packed.gathered_mm(x, &experts).unwrap());
        assert_close(&got, &want);
        assert_close(&got_grad, &want_grad);
    }

    #[test]
    fn bf16_products_equal_dense_bf16_weights() {
        let (packed, dense) = random(4, 8, 1, 2);
        let packed = PackedWeights::new(packed.blocks, packed.scales, Kind::BFloat16).unwrap();
        let dense = dense.to_kind(Kind::BFloat16);
        let x = Tensor::randn([7, 32], (Kind::BFloat16, Device::Cpu));
        let g = Tensor::randn([7, 8], (Kind::BFloat16, Device::Cpu));
        let offsets = Tensor::from_slice(&[1i32, 3, 3, 7]);
        let experts = Tensor::from_slice(&[0i64, 1, 1, 3, 3, 3, 3]);
        let (want, want_grad) = value_and_grad(&x, &g, |x| dense_product(x, &dense, &offsets));
        // The same operation on the same bf16 weights: the same bits.
        let (got, got_grad) = value_and_grad(&x, &g, |x| packed.grouped_mm(x, &offsets).unwrap());
        assert!(got.equal(&want) && got_grad.equal(&want_grad));
        // A batched matmul sums in another order: bf16's rounding (2^-8 relative) apart.
        let (got, got_grad) = value_and_grad(&x, &g, |x| packed.gathered_mm(x, &experts).unwrap());
        for (a, b) in [(got, want), (got_grad, want_grad)] {
            let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
            let diff = (&a - &b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(diff <= 1e-2 * scale, "differ by {diff} (scale {scale})");
        }
    }

    #[test]
    fn what_is_not_mxfp4_is_an_error_not_a_crash() {
        let blocks = Tensor::zeros([2, 4, 1, 16], (Kind::Uint8, Device::Cpu));
        let scales = Tensor::zeros([2, 4, 2], (Kind::Uint8, Device::Cpu));
        assert!(PackedWeights::new(blocks.shallow_clone(), scales, Kind::Float).is_err());
        let floats = Tensor::zeros([2, 4, 1], (Kind::Float, Device::Cpu));
        assert!(PackedWeights::new(blocks.shallow_clone(), floats, Kind::Float).is_err());
        let scales = Tensor::zeros([2, 4, 1], (Kind::Uint8, Device::Cpu));
        assert!(PackedWeights::new(blocks.shallow_clone(), scales, Kind::Half).is_err());
        let scales = Tensor::zeros([2, 4, 1], (Kind::Uint8, Device::Cpu));
        let packed = PackedWeights::new(blocks, scales, Kind::Float).unwrap();
        let x = Tensor::zeros([3, 16], (Kind::Float, Device::Cpu));
        assert!(packed
            .grouped_mm(&x, &Tensor::from_slice(&[3i32, 3]))
            .is_err());
        // An expert out of range is libtorch's error, returned.
        let x = Tensor::zeros([1, 32], (Kind::Float, Device::Cpu));
        let err = packed
            .gathered_mm(&x, &Tensor::from_slice(&[5i64]))
            .unwrap_err();
        assert!(err.to_string().contains("index"), "{err}");
    }
}
