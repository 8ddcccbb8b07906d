//! Drawing tokens from a distribution over the vocabulary, on the device, in a way that does not
//! depend on what else is in the batch: an exponential race in two levels ([`Blocks`]).
//!
//! Each token `i` of weight `w_i` gets a clock `E_i / w_i` with `E_i` exponential(1); the
//! earliest clock wins, which draws `i` with probability `w_i / Σ w` exactly. Run over the
//! whole vocabulary that needs a uniform per token; run in two levels it needs about
//! `2√vocab`: each block of tokens races on its mass, then the tokens of the winning block race
//! on their weights, with one set of token uniforms for whichever block won (independent of
//! the block race, so the product is still `w_i / Σ w`).
//!
//! Why a race: a batch of another size sums in another order, so a row's logits differ by
//! float rounding between batches. Inverting the cumulative distribution over a 49,152-token
//! vocabulary turned such differences into other tokens whenever a draw landed among tail
//! tokens narrower than the running sum's error (5 of 32 seeded 32-token requests on the
//! default model in f32, `bench --what seeded_crowd`); a race changes its winner only when two
//! clocks tie to within that rounding.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::rng::SplitMix64;

/// How a draw splits the vocabulary: `count` blocks of `size` tokens (the last one padded with
/// tokens of weight 0), `size` the power of two at or above √vocab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    /// Tokens per block.
    pub size: i64,
    /// Blocks.
    pub count: i64,
}

/// The largest uniform the device uses (`1 - 2^-24`, the last f32 below 1): its clock, 16.6, is
/// the latest a token can get; a draw of probability 6e-8 is rounded to it.
const LAST_BELOW_ONE: f64 = 1.0 - 1.0 / (1u64 << 24) as f64;

impl Blocks {
    /// The blocks of a vocabulary of `vocab` tokens.
    pub fn of(vocab: i64) -> Blocks {
        let size = ((vocab.max(1) as f64).sqrt().ceil() as u64).next_power_of_two() as i64;
        Blocks {
            size,
            count: (vocab.max(1) + size - 1) / size,
        }
    }

    /// Uniforms one draw takes: one per block, then one per token of a block.
    pub fn uniforms_per_draw(self) -> usize {
        (self.count + self.size) as usize
    }

    /// The uniforms of `draws` draws from `rng`, one draw after the other, as [`Blocks::race`]
    /// reads them.
    pub fn uniforms(self, rng: &mut SplitMix64, draws: usize) -> Vec<f32> {
        (0..draws * self.uniforms_per_draw())
            .map(|_| uniform(rng.next_u64()))
            .collect()
    }

    /// Draws `draws` tokens from each row of `weights` (`[rows, vocab]`, nonnegative, every row
    /// with some positive weight), the `d`-th of row `r` on `uniforms[r, d]`
    /// (`[rows, draws, uniforms_per_draw]`, from [`Blocks::uniforms`]); returns the token
    /// ids, `[rows, draws]`. A token of weight 0 is never drawn.
    pub fn race(self, weights: &Tensor, uniforms: &Tensor) -> Result<Tensor> {
        let (rows, vocab) = (weights.size()[0], weights.size()[1]);
        let draws = uniforms.size()[1];
        // Exponential clocks -ln(1 - v): v near 0 keeps its precision in f32, so the earliest
        // clocks are resolved to ~1e-16; the latest is that of LAST_BELOW_ONE.
        let clocks = uniforms
            .f_clamp_max(LAST_BELOW_ONE)?
            .f_neg()?
            .f_log1p()?
            .f_neg()?;
        let block_clocks = clocks.f_narrow(2, 0, self.count)?;
        let token_clocks = clocks.f_narrow(2, self.count, self.size)?;
        let by_block = weights
            .f_constant_pad_nd([0, self.count * self.size - vocab])?
            .f_view([rows, self.count, self.size])?;
        // Scores weight / clock: 0 for weight 0, positive otherwise; the largest wins.
        let mass = by_block.f_sum_dim_intlist([-1i64].as_slice(), true, Kind::Float)?;
        let block = mass
            .f_transpose(1, 2)?
            .f_div(&block_clocks)?
            .f_argmax(-1, true)?;
        let members =
            by_block.f_gather(1, &block.f_expand([rows, draws, self.size], false)?, false)?;
        let token = members.f_div(&token_clocks)?.f_argmax(-1, true)?;
        Ok(block
            .f_mul_scalar(self.size)?
            .f_add(&token)?
            .f_squeeze_dim(-1)?)
    }
}

/// A uniform in (0, 1) from 53 random bits, as f32: never 0; values near 1 round to 1, which
/// [`Blocks::race`] clamps.
fn uniform(bits: u64) -> f32 {
    (((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(weights: &[f32], rows: usize, draws: usize, seed: u64) -> Vec<i64> {
        let vocab = weights.len() as i64;
        let blocks = Blocks::of(vocab);
        let mut rng = SplitMix64::new(seed);
        let uniforms = blocks.uniforms(&mut rng, rows * draws);
        let uniforms = Tensor::from_slice(&uniforms).view([
            rows as i64,
            draws as i64,
            blocks.uniforms_per_draw() as i64,
        ]);
        let weights = Tensor::from_slice(weights)
            .view([1, vocab])
            .repeat([rows as i64, 1]);
        let ids = blocks.race(&weights, &uniforms).unwrap();
        assert_eq!(ids.size(), [rows as i64, draws as i64]);
        Vec::<i64>::try_from(ids.view([-1])).unwrap()
    }

    #[test]
    fn blocks_cover_the_vocabulary_with_about_two_square_roots_of_uniforms() {
        assert_eq!(
            Blocks::of(49_152),
            Blocks {
                size: 256,
                count: 192
            }
        );
        assert_eq!(
            Blocks::of(1000),
            Blocks {
                size: 32,
                count: 32
            }
        );
        assert_eq!(Blocks::of(3), Blocks { size: 2, count: 2 });
        assert_eq!(Blocks::of(1), Blocks { size: 1, count: 1 });
        assert_eq!(Blocks::of(49_152).uniforms_per_draw(), 448);
    }

    #[test]
    fn draws_follow_the_weights_in_every_block_and_skip_weight_zero() {
        // 1,000 tokens: 32 blocks of 32, the last padded with 24 tokens of weight 0. Weights
        // fall by e^-2 over the vocabulary, with every fifth token at 0, so every block is
        // drawn from often (the last about 1,200 times in 40,000).
        let weights: Vec<f32> = (0..1000)
            .map(|i| {
                if i % 5 == 4 {
                    0.0
                } else {
                    (-0.002 * i as f32).exp()
                }
            })
            .collect();
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let ids = draw(&weights, 40, 1000, 3);
        assert!(ids.iter().all(|&t| (0..1000).contains(&t) && t % 5 != 4));
        for block in 0..32 {
            let range = block * 32..(block * 32 + 32).min(1000);
            let p: f64 = range
                .clone()
                .map(|i| f64::from(weights[i as usize]))
                .sum::<f64>()
                / total;
            let want = p * ids.len() as f64;
            let got = ids.iter().filter(|&&t| range.contains(&t)).count() as f64;
            assert!(
                (got - want).abs() < 4.0 * want.sqrt(),
                "block {block}: {got} drawn, {want:.0} expected"
            );
        }
        // Single tokens too: the first, one inside the first block, one in the padded block.
        for token in [0i64, 3, 998] {
            let want = f64::from(weights[token as usize]) / total * ids.len() as f64;
            let got = ids.iter().filter(|&&t| t == token).count() as f64;
            assert!(
                (got - want).abs() < 4.0 * want.sqrt() + 3.0,
                "token {token}: {got} drawn, {want:.0} expected"
            );
        }
    }

    #[test]
    fn one_positive_weight_is_always_drawn() {
        let mut weights = vec![0f32; 300];
        weights[299] = 1e-30;
        assert!(draw(&weights, 4, 50, 9).iter().all(|&t| t == 299));
    }
}
