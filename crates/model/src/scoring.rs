//! What a sampling request asks to learn besides its samples (the SDK's sampling extras):
//! prompt logprobs (all or the last n), the top-k next tokens at each prompt position and each
//! generated position, the logprobs of chosen ids at chosen prompt positions, and tokens drawn
//! from the model's own distribution at every prompt position.
//!
//! Every logprob here is the model's, at temperature 1 and before top-k/top-p (as the sampled
//! tokens' logprobs are).

use tch::{Kind, Tensor};

use crate::draw::Blocks;
use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;
use crate::sample::MIN_SAMPLED_TEMPERATURE;

/// Widest top-k, target row or number of alternative draws one request may ask for: each costs
/// `prompt length × width` values in the answer.
pub const MAX_SCORED_WIDTH: usize = 128;

/// A position's most likely tokens with their logprobs, most likely first.
pub type TopK = Vec<(i64, f32)>;

/// The extras one request asks for.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scoring {
    /// The logprob of each prompt token given its prefix (`prompt_logprobs`).
    pub prompt_logprobs: bool,
    /// The k most likely tokens at each prompt position (`topk_prompt_logprobs`; 0: none).
    pub prompt_top_k: usize,
    /// Score (logprobs and top-k) only the last n prompt tokens (`prompt_logprobs_last_n`).
    pub prompt_last_n: Option<usize>,
    /// Ids to score at each prompt position after the first, `[len - 1][K]`, `-1` for none
    /// (`target_prompt_logprobs`).
    pub prompt_targets: Option<Vec<Vec<i64>>>,
    /// The cells `prompt_targets` listed when it came sparse; the answer keeps that layout.
    pub prompt_targets_layout: Option<CsrLayout>,
    /// Tokens drawn at each prompt position after the first, at the request's temperature
    /// (`prompt_alt_tokens_k`; 0: none).
    pub prompt_alt_k: usize,
    /// The k most likely tokens at each generated position (`topk_sample_logprobs`; 0: none).
    pub sample_top_k: usize,
}

impl Scoring {
    /// Just the prompt's logprobs (or nothing).
    pub fn prompt_logprobs(asked: bool) -> Self {
        Scoring {
            prompt_logprobs: asked,
            ..Scoring::default()
        }
    }

    /// Whether anything is computed over the prompt's positions.
    pub fn scores_prompt(&self) -> bool {
        self.prompt_logprobs
            || self.prompt_top_k > 0
            || self.prompt_targets.is_some()
            || self.prompt_alt_k > 0
    }

    /// Checks the extras against a prompt and the model's vocabulary; errors name the SDK's
    /// field.
    pub fn validate(&self, prompt_len: usize, vocab: i64) -> Result<()> {
        for (field, width) in [
            ("topk_prompt_logprobs", self.prompt_top_k),
            ("topk_sample_logprobs", self.sample_top_k),
            ("prompt_alt_tokens_k", self.prompt_alt_k),
        ] {
            if width > MAX_SCORED_WIDTH {
                return Err(ModelError::invalid(
                    field,
                    format!("at most {MAX_SCORED_WIDTH}, got {width}"),
                ));
            }
        }
        if let Some(n) = self.prompt_last_n {
            if !self.prompt_logprobs {
                return Err(ModelError::invalid(
                    "prompt_logprobs_last_n",
                    "requires prompt_logprobs (include_prompt_logprobs=True)",
                ));
            }
            if n < 1 || n + 1 > prompt_len {
                return Err(ModelError::invalid(
                    "prompt_logprobs_last_n",
                    format!(
                        "must be between 1 and the prompt's length minus one ({}), got {n}",
                        prompt_len.saturating_sub(1)
                    ),
                ));
            }
        }
        if let Some(rows) = &self.prompt_targets {
            let field = "target_prompt_logprobs";
            if rows.len() + 1 != prompt_len {
                return Err(ModelError::invalid(
                    field,
                    format!(
                        "must have one row per prompt position after the first ({}), got {}",
                        prompt_len.saturating_sub(1),
                        rows.len()
                    ),
                ));
            }
            let width = rows.first().map_or(0, Vec::len);
            if width == 0 || width > MAX_SCORED_WIDTH || rows.iter().any(|r| r.len() != width) {
                return Err(ModelError::invalid(
                    field,
                    format!("rows must all hold the same 1 to {MAX_SCORED_WIDTH} ids"),
                ));
            }
            if let Some(bad) = rows.iter().flatten().find(|&&t| t < -1 || t >= vocab) {
                return Err(ModelError::invalid(
                    field,
                    format!("id {bad} is outside the vocabulary (0..{vocab}, or -1 for none)"),
                ));
            }
            if rows.iter().flatten().all(|&t| t == -1) {
                return Err(ModelError::invalid(field, "names no id (every cell is -1)"));
            }
        }
        Ok(())
    }
}

/// Draws of `k` tokens at each prompt position after the first: `[len - 1][k]` ids and their
/// logprobs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AltTokens {
    /// Drawn ids.
    pub tokens: Vec<Vec<i64>>,
    /// Their logprobs.
    pub logprobs: Vec<Vec<f32>>,
}

/// The cells of a sparse (CSR) `[rows, cols]` matrix: row `r` lists columns
/// `col[crow[r]..crow[r + 1]]`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CsrLayout {
    /// `rows + 1` offsets into `col`.
    pub crow: Vec<i64>,
    /// Column of each listed cell.
    pub col: Vec<i64>,
}

impl CsrLayout {
    /// The values of `dense` at the listed cells, in order (cells outside it give 0).
    pub fn gather<T: Copy + Default>(&self, dense: &[Vec<T>]) -> Vec<T> {
        let mut values = Vec::with_capacity(self.col.len());
        for (r, span) in self.crow.windows(2).enumerate() {
            for &c in &self.col[span[0] as usize..span[1] as usize] {
                let cell = dense.get(r).and_then(|row| row.get(c as usize));
                values.push(cell.copied().unwrap_or_default());
            }
        }
        values
    }
}

/// What a request learned about its prompt, filled as its prompt is prefilled.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptScores {
    /// Per prompt token (`None` for the first, and before the last n when asked so).
    #[serde(default, rename = "prompt_logprobs")]
    pub logprobs: Option<Vec<Option<f32>>>,
    /// Per prompt token, likewise.
    #[serde(default, rename = "prompt_top_k")]
    pub top_k: Option<Vec<Option<TopK>>>,
    /// `[len - 1][K]`: the logprobs of the requested ids (0.0 where the request had -1).
    #[serde(default, rename = "prompt_targets")]
    pub targets: Option<Vec<Vec<f32>>>,
    /// The request's sparse layout of `targets`, which the answer keeps (`None`: dense).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets_layout: Option<CsrLayout>,
    /// The alternative draws.
    #[serde(default, rename = "prompt_alt")]
    pub alt: Option<AltTokens>,
}

/// Fills a request's [`PromptScores`] as its prompt's positions are computed (all at once, or a
/// prefill chunk at a time).
#[derive(Debug, Clone)]
pub struct PromptScorer {
    scoring: Scoring,
    temperature: f64,
    rng: SplitMix64,
    scores: PromptScores,
}

impl PromptScorer {
    /// A scorer for `scoring`; alternative draws use `temperature` and `seed`.
    pub fn new(scoring: &Scoring, temperature: f64, seed: u64) -> Self {
        PromptScorer {
            scoring: scoring.clone(),
            temperature,
            rng: SplitMix64::new(seed),
            scores: PromptScores {
                // Position 0 has no context: never scored.
                logprobs: scoring.prompt_logprobs.then(|| vec![None]),
                top_k: (scoring.prompt_top_k > 0).then(|| vec![None]),
                targets: scoring.prompt_targets.as_ref().map(|_| Vec::new()),
                targets_layout: scoring.prompt_targets_layout.clone(),
                alt: (scoring.prompt_alt_k > 0).then(AltTokens::default),
            },
        }
    }

    /// Whether the request asks for anything about its prompt.
    pub fn is_needed(&self) -> bool {
        self.scoring.scores_prompt()
    }

    /// What was computed.
    pub fn finish(self) -> PromptScores {
        self.scores
    }

    /// Scores the positions `from + 1 ..= from + n` of `prompt`, where row `i` of `logits`
    /// (`[n, vocab]`, on any device) is the next-token distribution after prompt token
    /// `from + i`. Positions must come in order.
    pub fn add(&mut self, prompt: &[i64], from: usize, logits: &Tensor) -> Result<()> {
        let n = logits.size()[0] as usize;
        if n == 0 {
            return Ok(());
        }
        let device = logits.device();
        let on_host = |t: &Tensor| t.f_to_device(tch::Device::Cpu);
        let log_probs = logits.f_log_softmax(-1, Kind::Float)?;
        let len = prompt.len();
        let scored = |position: usize| {
            self.scoring
                .prompt_last_n
                .is_none_or(|last| position + last >= len)
        };
        if let Some(out) = &mut self.scores.logprobs {
            let targets =
                Tensor::from_slice(&prompt[from + 1..from + 1 + n]).f_to_device(device)?;
            let picked = log_probs.f_gather(1, &targets.f_unsqueeze(1)?, false)?;
            let values = Vec::<f32>::try_from(&on_host(&picked.f_flatten(0, -1)?)?)?;
            for (i, v) in values.into_iter().enumerate() {
                out.push(scored(from + 1 + i).then_some(v));
            }
        }
        if let Some(out) = &mut self.scores.top_k {
            let rows = top_k_of(&log_probs, self.scoring.prompt_top_k)?;
            for (i, row) in rows.into_iter().enumerate() {
                out.push(scored(from + 1 + i).then_some(row));
            }
        }
        if let (Some(out), Some(rows)) = (&mut self.scores.targets, &self.scoring.prompt_targets) {
            let rows = &rows[from..from + n];
            let width = rows[0].len();
            let ids: Vec<i64> = rows.iter().flatten().map(|&t| t.max(0)).collect();
            let ids = Tensor::from_slice(&ids)
                .f_view([n as i64, width as i64])?
                .f_to_device(device)?;
            let picked = log_probs.f_gather(1, &ids, false)?;
            let values = Vec::<f32>::try_from(&on_host(&picked.f_flatten(0, -1)?)?)?;
            for (row, got) in rows.iter().zip(values.chunks(width)) {
                out.push(
                    row.iter()
                        .zip(got)
                        .map(|(&t, &v)| if t < 0 { 0.0 } else { v })
                        .collect(),
                );
            }
        }
        if let Some(out) = &mut self.scores.alt {
            let k = self.scoring.prompt_alt_k;
            let ids = if self.temperature < MIN_SAMPLED_TEMPERATURE {
                log_probs
                    .f_argmax(-1, true)?
                    .f_expand([n as i64, k as i64], false)?
                    .f_contiguous()?
            } else {
                // Draws from softmax(logits / T) by the race of `crate::draw`, on uniforms from
                // the request's own stream (repeatable when the request is seeded).
                let weights = (logits.f_to_kind(Kind::Float)? / self.temperature)
                    .f_softmax(-1, Kind::Float)?;
                let blocks = Blocks::of(logits.size()[1]);
                let uniforms = Tensor::from_slice(&blocks.uniforms(&mut self.rng, n * k))
                    .f_view([n as i64, k as i64, blocks.uniforms_per_draw() as i64])?
                    .f_to_device(device)?;
                blocks.race(&weights, &uniforms)?
            };
            let picked = log_probs.f_gather(1, &ids, false)?;
            let values = Vec::<f32>::try_from(&on_host(&picked.f_flatten(0, -1)?)?)?;
            let ids = Vec::<i64>::try_from(&on_host(&ids.f_flatten(0, -1)?)?)?;
            out.tokens.extend(ids.chunks(k).map(<[i64]>::to_vec));
            out.logprobs.extend(values.chunks(k).map(<[f32]>::to_vec));
        }
        Ok(())
    }
}

/// The `k` most likely tokens of each row of `logits` (`[rows, vocab]`) with their logprobs:
/// one transfer to the host.
pub fn top_k_rows(logits: &Tensor, k: usize) -> Result<Vec<TopK>> {
    top_k_of(&logits.f_log_softmax(-1, Kind::Float)?, k)
}

/// [`top_k_rows`] of rows that are already logprobs.
fn top_k_of(log_probs: &Tensor, k: usize) -> Result<Vec<TopK>> {
    let rows = log_probs.size()[0] as usize;
    let k = (k as i64).min(log_probs.size()[1]);
    let (values, ids) = log_probs.f_topk(k, -1, true, true)?;
    let host = |t: Tensor| t.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu);
    let values = Vec::<f32>::try_from(&host(values)?)?;
    let ids = Vec::<i64>::try_from(&host(ids)?)?;
    Ok((0..rows)
        .map(|r| {
            let span = (r * k as usize)..((r + 1) * k as usize);
            ids[span.clone()]
                .iter()
                .copied()
                .zip(values[span].iter().copied())
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: Scoring, prompt_len: usize, field: &str) {
        match s.validate(prompt_len, 100) {
            Err(ModelError::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn bounds_are_checked_naming_the_field() {
        let ok = Scoring {
            prompt_logprobs: true,
            prompt_top_k: MAX_SCORED_WIDTH,
            prompt_last_n: Some(3),
            prompt_targets: Some(vec![vec![-1, 5], vec![99, -1], vec![-1, -1]]),
            prompt_targets_layout: None,
            prompt_alt_k: 1,
            sample_top_k: 2,
        };
        ok.validate(4, 100).unwrap();
        let with = |f: fn(&mut Scoring)| {
            let mut s = ok.clone();
            f(&mut s);
            s
        };
        refused(
            with(|s| s.prompt_top_k = MAX_SCORED_WIDTH + 1),
            4,
            "topk_prompt_logprobs",
        );
        refused(with(|s| s.sample_top_k = 1000), 4, "topk_sample_logprobs");
        refused(with(|s| s.prompt_alt_k = 129), 4, "prompt_alt_tokens_k");
        refused(
            with(|s| s.prompt_logprobs = false),
            4,
            "prompt_logprobs_last_n",
        );
        refused(
            with(|s| s.prompt_last_n = Some(4)),
            4,
            "prompt_logprobs_last_n",
        );
        refused(
            with(|s| s.prompt_last_n = Some(0)),
            4,
            "prompt_logprobs_last_n",
        );
        let targets = "target_prompt_logprobs";
        refused(ok.clone(), 5, targets);
        refused(
            with(|s| s.prompt_targets = Some(vec![vec![1], vec![1, 2], vec![1]])),
            4,
            targets,
        );
        refused(
            with(|s| s.prompt_targets = Some(vec![vec![100]; 3])),
            4,
            targets,
        );
        refused(
            with(|s| s.prompt_targets = Some(vec![vec![-2]; 3])),
            4,
            targets,
        );
        refused(
            with(|s| s.prompt_targets = Some(vec![vec![-1]; 3])),
            4,
            targets,
        );
        refused(
            with(|s| s.prompt_targets = Some(vec![vec![]; 3])),
            4,
            targets,
        );
    }
}
