//! Rotary position embeddings, computed as transformers computes them (f32, `rotate_half`).

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;

/// Inverse frequencies of one model; cos/sin tables are computed per call for the positions used.
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// Builds the inverse frequencies, with llama3 scaling when the config asks for it.
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let dim = config.head_dim;
        let exponent = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let mut inv_freq = Tensor::f_pow_scalar(config.rope_theta, &exponent)?.f_reciprocal()?;
        if let Some(s) = &config.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * PI)?;
            let scaled = inv_freq.f_div_scalar(s.factor)?;
            let llama = scaled.f_where_self(&wavelen.f_gt(low_wavelen)?, &inv_freq)?;
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
            inv_freq = smoothed.f_where_self(&medium, &llama)?;
        }
        Ok(Rope {
            inv_freq: inv_freq.f_to_device(device)?,
        })
    }

    /// Another handle on the same table.
    pub fn shallow_clone(&self) -> Rope {
        Rope {
            inv_freq: self.inv_freq.shallow_clone(),
        }
    }

    /// `(cos, sin)`, each `[len, head_dim]` in `kind`, for positions `start..start+len`.
    pub fn cos_sin(&self, start: i64, len: i64, kind: Kind) -> Result<(Tensor, Tensor)> {
        let positions =
            Tensor::f_arange_start(start, start + len, (Kind::Float, self.inv_freq.device()))?;
        self.cos_sin_at(&positions, kind)
    }

    /// `(cos, sin)` for arbitrary positions (any shape `[..]` → `[.., head_dim]`).
    pub fn cos_sin_at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` by cos/sin broadcastable to it.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.size()[3] / 2;
        let x1 = x.f_narrow(-1, 0, half)?;
        let x2 = x.f_narrow(-1, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
        Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
    }
}
