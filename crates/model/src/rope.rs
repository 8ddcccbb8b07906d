//! Rotary position embeddings, computed as transformers computes them (f32 tables, `rotate_half`).

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use crate::config::{Llama3RopeScaling, ModelConfig, RopeScaling, YarnRopeScaling};
use crate::error::Result;

/// Inverse frequencies and signs of one model's rotary tables; cos/sin tables are computed per
/// call for the positions used.
pub struct Rope {
    /// The inverse frequency of every column of a table (`[head_dim]`: the `head_dim / 2`
    /// frequencies, twice, as transformers concatenates them).
    inv_freq: Tensor,
    /// `[head_dim]`: -1 in the first half, 1 in the second (the signed sin's signs).
    sign: Tensor,
    /// What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
    attention_factor: f64,
}

impl Rope {
    /// Builds the inverse frequencies, with llama3 or YaRN scaling when the config asks for it.
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let dim = config.head_dim;
        let exponent = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        // `base^(2i/d)`: the wavelength over 2π of each frequency.
        let pos_freqs = Tensor::f_pow_scalar(config.rope_theta, &exponent)?;
        let (inv_freq, attention_factor) = match &config.rope_scaling {
            None => (pos_freqs.f_reciprocal()?, 1.0),
            Some(RopeScaling::Llama3(s)) => (llama3(&pos_freqs.f_reciprocal()?, s)?, 1.0),
            Some(RopeScaling::Yarn(y)) => (
                yarn(&pos_freqs, y, dim, config.rope_theta)?,
                y.attention_factor,
            ),
        };
        let half = dim / 2;
        let sign = Tensor::f_cat(
            &[
                Tensor::f_full([half], -1.0, (Kind::Float, Device::Cpu))?,
                Tensor::f_ones([half], (Kind::Float, Device::Cpu))?,
            ],
            0,
        )?;
        Ok(Rope {
            inv_freq: Tensor::f_cat(&[&inv_freq, &inv_freq], 0)?.f_to_device(device)?,
            sign: sign.f_to_device(device)?,
            attention_factor,
        })
    }

    /// Another handle on the same table.
    pub fn shallow_clone(&self) -> Rope {
        Rope {
            inv_freq: self.inv_freq.shallow_clone(),
            sign: self.sign.shallow_clone(),
            attention_factor: self.attention_factor,
        }
    }

    /// `(cos, sin)`, each `[len, head_dim]` in `kind`, for positions `start..start+len`.
    pub fn cos_sin(&self, start: i64, len: i64, kind: Kind) -> Result<(Tensor, Tensor)> {
        let positions =
            Tensor::f_arange_start(start, start + len, (Kind::Float, self.inv_freq.device()))?;
        self.cos_sin_at(&positions, kind)
    }

    /// `(cos, signed sin)` for arbitrary positions (any shape `[..]` → `[.., head_dim]`). The
    /// first half of the sin table is negated: see [`Rope::apply`].
    pub fn cos_sin_at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq)?;
        let (cos, sin) = (freqs.f_cos()?, freqs.f_sin()?);
        // YaRN scales both tables in f32, as transformers does.
        let (cos, sin) = if self.attention_factor == 1.0 {
            (cos, sin)
        } else {
            (
                cos.f_mul_scalar(self.attention_factor)?,
                sin.f_mul_scalar(self.attention_factor)?,
            )
        };
        Ok((
            cos.f_to_kind(kind)?,
            sin.f_mul(&self.sign)?.f_to_kind(kind)?,
        ))
    }

    /// The rotation [`Rope::apply`] performs, as matrices: `[.., d]` tables of
    /// [`Rope::cos_sin_at`] give `[.., d, d]` matrices `R` with `x · R` = `apply(x)` for a row
    /// vector `x`: `R[j][j] = cos_j` and `R[(j + d/2) mod d][j]` = the signed sin `s_j`
    /// (`−sin_j` in the first half, `sin_j` in the second), every other entry 0. A decode step
    /// rotates each layer's queries and keys by one batched matmul with them instead of three
    /// elementwise operations (decode is bound by the number of operations per layer); the
    /// products are the same, each output summed in one rounding.
    pub fn rotation(cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
        let half = cos.size().last().copied().unwrap_or(0) / 2;
        Ok(cos
            .f_diag_embed(0, -2, -1)?
            .f_add(&signed_sin.f_diag_embed(0, -2, -1)?.f_roll([half], [-2])?)?)
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` by the tables of [`Rope::cos_sin_at`]
    /// (broadcastable to it): `x·cos + rotate_half(x)·sin`, where `rotate_half(x) =
    /// [-x₂, x₁]`, is computed as `x·cos + roll(x)·[-sin, sin]` with `roll(x) = [x₂, x₁]`: the
    /// same products (negation is exact), in three operations (roll, mul, addcmul) instead of
    /// seven.
    pub fn apply(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
        let half = x.size()[3] / 2;
        let rolled = x.f_roll([half], [-1])?;
        Ok(x.f_mul(cos)?.f_addcmul(&rolled, signed_sin)?)
    }
}

/// Llama-3 scaling of `inv_freq` (`[head_dim / 2]`, f32), as transformers computes it.
fn llama3(inv_freq: &Tensor, s: &Llama3RopeScaling) -> Result<Tensor> {
    let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * PI)?;
    let scaled = inv_freq.f_div_scalar(s.factor)?;
    let llama = scaled.f_where_self(&wavelen.f_gt(low_wavelen)?, inv_freq)?;
    let smooth = wavelen
        .f_reciprocal()?
        .f_mul_scalar(s.original_max_position_embeddings)?
        .f_sub_scalar(s.low_freq_factor)?
        .f_div_scalar(s.high_freq_factor - s.low_freq_factor)?;
    let smoothed = smooth
        .f_neg()?
        .f_add_scalar(1.0)?
        .f_mul(&llama.f_div_scalar(s.factor)?)?
        .f_add(&smooth.f_mul(&llama)?)?;
    let medium = wavelen
        .f_ge(high_wavelen)?
        .f_logical_and(&wavelen.f_le(low_wavelen)?)?;
    Ok(smoothed.f_where_self(&medium, &llama)?)
}

/// YaRN's inverse frequencies from `pos_freqs` (`base^(2i/d)`, `[dim / 2]`, f32), as
/// transformers computes them: dimension `i` keeps `1 / pos_freqs` (extrapolation) below the
/// correction range, takes `1 / (factor · pos_freqs)` (interpolation) above it, and blends the
/// two along a linear ramp inside.
fn yarn(pos_freqs: &Tensor, y: &YarnRopeScaling, dim: i64, base: f64) -> Result<Tensor> {
    let d = dim as f64;
    // The dimension whose frequency turns `rotations` times within the original context.
    let correction = |rotations: f64| {
        d * (y.original_max_position_embeddings / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction(y.beta_fast), correction(y.beta_slow));
    if y.truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    let ramp = Tensor::f_arange(dim / 2, (Kind::Float, Device::Cpu))?
        .f_sub_scalar(low)?
        .f_div_scalar(high - low)?
        .f_clamp(0.0, 1.0)?;
    let extrapolation = pos_freqs.f_reciprocal()?;
    let interpolation = pos_freqs.f_mul_scalar(y.factor)?.f_reciprocal()?;
    // The share of extrapolation.
    let kept = ramp.f_neg()?.f_add_scalar(1.0)?;
    Ok(interpolation
        .f_mul(&kept.f_neg()?.f_add_scalar(1.0)?)?
        .f_add(&extrapolation.f_mul(&kept)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrices of `rotation` rotate as `apply` does (f32: the same two products per
    /// output, summed in another order, so equal to rounding).
    #[test]
    fn rotation_matrices_rotate_as_apply_does() {
        tch::manual_seed(3);
        let config = ModelConfig::from_json(
            r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,
                "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100}"#,
        )
        .unwrap();
        let rope = Rope::new(&config, Device::Cpu).unwrap();
        let d = config.head_dim;
        let positions = Tensor::from_slice(&[0i64, 5, 17, 300]).view([4, 1]);
        let (cos, sin) = rope.cos_sin_at(&positions, Kind::Float).unwrap();
        let x = Tensor::randn([4, 1, 3, d], (Kind::Float, Device::Cpu));
        let want = Rope::apply(&x, &cos.unsqueeze(2), &sin.unsqueeze(2)).unwrap();
        let rotation = Rope::rotation(&cos, &sin).unwrap().view([4, d, d]);
        let got = x.view([4, 3, d]).bmm(&rotation).view([4, 1, 3, d]);
        let err = (got - &want).abs().max().double_value(&[]);
        assert!(err < 1e-6, "max difference {err}");
        assert!(want.abs().max().double_value(&[]) > 0.5);
    }
}
