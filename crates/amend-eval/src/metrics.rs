//! The metrics of a comparison and their estimators.
//!
//! # The ideal update
//!
//! The minimal targeted update of `p°` that never produces the unwanted set `U` is `p°`
//! conditioned on `y ∉ U` (the TNT paper, §2):
//!
//! ```text
//! p*(y|x) = p°(y|x)·1[y ∉ U] / Z(x),        Z(x) = 1 − p°(U|x)
//! ```
//!
//! `y` is a whole response: the tokens up to and including the end-of-sequence token, or the
//! first `max_new_tokens` tokens when none is produced (the distribution of the truncated
//! sampling process, so that `log p(y|x)` is exactly the sum of the scored tokens' log-probs).
//!
//! # Estimators
//!
//! **Unwanted rate.** `N = P·m` responses sampled from `p_new` at temperature 1 (`m` per
//! held-out prompt, seeded by position, the same seeds for every method: common random numbers
//! make differences between methods less noisy than each rate); `r̂ = #{y ∈ U}/N` with the
//! binomial standard error `√(r̂(1 − r̂)/N)`. For a fixed set of prompts this is conservative
//! (the variance of the mean of per-prompt rates is at most the binomial one).
//!
//! **`KL(p*‖p_new)`**, from rejection samples of `p°`. For each held-out prompt `x_i` draw `m_i`
//! responses from `p°`, keep the `a_i` that are not in `U` (exact samples of `p*`), and estimate
//! `Z(x_i)` by the acceptance rate `Ẑ_i = a_i/m_i`:
//!
//! ```text
//! K̂_i  = (1/a_i) Σ_{j accepted} [log p°(y_j|x_i) − log p_new(y_j|x_i)] − log Ẑ_i
//! KL̂   = (1/P′) Σ_i K̂_i          over the P′ prompts with a_i ≥ 1
//! se   = sd(K̂_i)/√P′
//! ```
//!
//! The first term is an unbiased estimate of `E_{p*}[log p° − log p_new]`. The second is the
//! plug-in `−log Ẑ_i`, which over-estimates `−log Z(x_i)` (Jensen): by the delta method its
//! bias is about `(1 − Z)/(2·m_i·Z)`, 0.006 nats for `Z = 0.8` and `m_i = 16`. It does not depend
//! on `p_new`: every method, and `p°` itself (`KL(p*‖p°) = −E log Z`), is shifted by the same
//! amount computed from the same samples, so comparisons between methods are unaffected. Prompts
//! without an accepted sample (`a_i = 0`) are left out and counted. The standard error is over
//! prompts: it covers the sampling of responses and of prompts from the task's prompt
//! distribution.
//!
//! **`KL(p°‖p_new)` on control prompts** (prompts whose responses are clean, where the ideal
//! update changes nothing): the mean over control prompts of `(1/m) Σ_j [log p°(y_j|x) −
//! log p_new(y_j|x)]`, `y_j ~ p°`; unbiased, standard error over prompts.
//!
//! **Held-out perplexity**: `exp(−Σ log p_new / Σ n)` over the response tokens (end of sequence
//! included) of clean held-out texts (clean, so that a model that never says an unwanted word is
//! not penalised for it).
//!
//! **Unwanted-token log-probability** (user data with annotated held-out responses): the mean
//! `log p_new` of the tokens inside unwanted spans of held-out responses.

use amend_models::{CausalLm, generate_ids, score_ids};
use serde::{Deserialize, Serialize};

use crate::annotate::{response_text, sampling_config};
use crate::detector::UnwantedWords;
use crate::task::{Split, SuppressionTask};
use crate::{Error, Result};

/// A mean with its standard error and the number of units it averages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The estimate.
    #[serde(deserialize_with = "f64_or_nan")]
    pub value: f64,
    /// Its standard error (NaN when undefined, for example over one unit; written as `null`
    /// in JSON, which has no NaN, and read back as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub se: f64,
    /// Units averaged (samples or prompts, see the metric).
    pub n: usize,
}

/// A number, or NaN for the `null` that serde_json writes for a non-finite one.
pub(crate) fn f64_or_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Estimate {
    /// Mean and standard error (`sd/√n`, sample standard deviation) of `xs`.
    pub fn mean_of(xs: &[f64]) -> Option<Estimate> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let se = if n > 1 {
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        } else {
            f64::NAN
        };
        Some(Estimate { value: mean, se, n })
    }

    /// A binomial proportion `k/n` with standard error `√(p(1 − p)/n)`.
    pub fn proportion(k: usize, n: usize) -> Option<Estimate> {
        if n == 0 {
            return None;
        }
        let p = k as f64 / n as f64;
        Some(Estimate { value: p, se: (p * (1.0 - p) / n as f64).sqrt(), n })
    }
}

/// The rejection-sampling estimate of `KL(p*‖p_new)` (see the [module docs](self)).
///
/// `prompts[i] = (accepted, drawn)`: the `(log p°(y|x_i), log p_new(y|x_i))` of the accepted
/// samples (`y ∉ U`) among the `drawn` samples of `p°` for prompt `x_i`. Prompts without an
/// accepted sample are left out; `None` when no prompt is left.
///
/// ```text
/// K̂_i = mean_{accepted} [log p° − log p_new] − log(a_i/drawn_i);   estimate = mean_i K̂_i ± sd/√P′
/// ```
///
/// ```
/// use amend_eval::metrics::kl_ideal_estimate;
/// // p_new = p°: only −log Ẑ is left (here 3 of 4 samples accepted).
/// let e = kl_ideal_estimate(&[(vec![(-1.0, -1.0), (-2.0, -2.0), (-3.0, -3.0)], 4)]).unwrap();
/// assert!((e.value - (4.0f64 / 3.0).ln()).abs() < 1e-12);
/// ```
pub fn kl_ideal_estimate(prompts: &[(Vec<(f64, f64)>, usize)]) -> Option<Estimate> {
    let per_prompt: Vec<f64> = prompts
        .iter()
        .filter(|(acc, drawn)| !acc.is_empty() && *drawn >= acc.len())
        .map(|(acc, drawn)| {
            let a = acc.len() as f64;
            let diff: f64 = acc.iter().map(|(b, n)| b - n).sum();
            diff / a - (a / *drawn as f64).ln()
        })
        .collect();
    Estimate::mean_of(&per_prompt)
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Samples of `p_new` per held-out prompt for the unwanted rate.
    pub samples_per_prompt: usize,
    /// Samples of `p°` per held-out prompt for the rejection sampler of `p*`.
    pub rejection_samples_per_prompt: usize,
    /// Samples of `p°` per control prompt for `KL(p°‖p_new)`.
    pub control_samples_per_prompt: usize,
    /// Longest response in tokens.
    pub max_new_tokens: usize,
    /// Rows decoded together.
    pub batch_size: usize,
    /// Rows scored together.
    pub score_batch_size: usize,
    /// Responses kept as examples per point (the first samples of the first prompts).
    pub examples: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            samples_per_prompt: 8,
            rejection_samples_per_prompt: 16,
            control_samples_per_prompt: 8,
            max_new_tokens: 40,
            batch_size: 256,
            score_batch_size: 128,
            examples: 4,
        }
    }
}

/// The metrics of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointMetrics {
    /// Fraction of sampled held-out responses in `U` (binomial standard error; `n` samples).
    pub unwanted_rate: Option<Estimate>,
    /// `KL(p*‖p_new)` in nats per response (standard error over prompts; `n` prompts).
    pub kl_ideal: Option<Estimate>,
    /// `KL(p°‖p_new)` on control prompts, nats per response (`n` prompts).
    pub kl_control: Option<Estimate>,
    /// Perplexity of clean held-out responses.
    pub heldout_perplexity: Option<f64>,
    /// Mean log-prob of unwanted tokens in annotated held-out responses (`n` tokens).
    pub unwanted_token_logprob: Option<Estimate>,
    /// A few sampled held-out responses `(prompt, response)`.
    pub examples: Vec<(String, String)>,
    /// Wall time of the evaluation.
    pub eval_seconds: f64,
}

/// A metric that could not be computed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The metric.
    pub metric: String,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScoredSeq {
    ids: Vec<u32>,
    start: usize,
    base_logp: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RejectionPrompt {
    accepted: Vec<ScoredSeq>,
    drawn: usize,
}

/// Facts about `p°` the evaluator established once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseFacts {
    /// `p°(U)` over held-out prompts estimated by the rejection sampler (1 − acceptance rate).
    pub rejection_unwanted_rate: Option<Estimate>,
    /// `KL(p*‖p°) = −mean log Ẑ(x)`.
    pub kl_ideal_base: Option<Estimate>,
    /// Held-out prompts with no accepted rejection sample (left out of `KL(p*‖·)`).
    pub prompts_without_accepted_sample: usize,
    /// Rejection samples drawn.
    pub rejection_samples: usize,
    /// Control samples drawn.
    pub control_samples: usize,
    /// Held-out texts scored for perplexity.
    pub heldout_texts: usize,
    /// Held-out unwanted tokens scored.
    pub heldout_unwanted_tokens: usize,
    /// Wall time of the set-up.
    pub seconds: f64,
}

/// Evaluates models against `p°` on a task: samples everything that depends only on `p°`
/// once ([`Evaluator::new`]), then scores any number of updated models
/// ([`Evaluator::evaluate`]).
#[derive(Debug, Clone)]
pub struct Evaluator {
    cfg: EvalConfig,
    seed: u64,
    detector: Option<UnwantedWords>,
    eval_prompts: Vec<(String, Vec<u32>)>,
    rejection: Vec<RejectionPrompt>,
    control: Vec<Vec<ScoredSeq>>,
    heldout: Vec<(Vec<u32>, usize)>,
    heldout_unwanted: Vec<(Vec<u32>, usize, Vec<usize>)>,
    facts: BaseFacts,
    skipped: Vec<Skipped>,
}

fn score_sum<M: CausalLm + ?Sized>(
    model: &M,
    seqs: &[Vec<u32>],
    starts: &[usize],
    batch: usize,
) -> Result<Vec<f64>> {
    if seqs.is_empty() {
        return Ok(vec![]);
    }
    Ok(score_ids(model, seqs, starts, batch)?.iter().map(|s| s.sum_logprob()).collect())
}

impl Evaluator {
    /// Samples and scores everything that only depends on `p°`: rejection samples for `p*`,
    /// control samples, held-out texts. `seed` seeds the samplers (the unwanted-rate samples of
    /// every evaluated model use `seed + 1`).
    ///
    /// # Errors
    /// [`Error::NoTokenizer`]; model errors.
    pub fn new<M: CausalLm + ?Sized>(
        base: &M,
        task: &SuppressionTask,
        cfg: EvalConfig,
        seed: u64,
    ) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let tok = base.tokenizer().ok_or(Error::NoTokenizer { op: "Evaluator::new" })?;
        let mut skipped = Vec::new();
        let eval_prompts: Vec<(String, Vec<u32>)> = task
            .eval_prompts
            .iter()
            .map(|p| Ok((p.clone(), tok.encode(p, true)?)))
            .collect::<Result<_>>()?;
        let mut facts = BaseFacts::default();
        let mut rejection = Vec::new();
        match (&task.detector, eval_prompts.is_empty()) {
            (Some(det), false) => {
                let m = cfg.rejection_samples_per_prompt.max(1);
                let prompts: Vec<Vec<u32>> = eval_prompts
                    .iter()
                    .flat_map(|(_, ids)| std::iter::repeat_n(ids.clone(), m))
                    .collect();
                let g = sampling_config(base, cfg.max_new_tokens, 1.0, seed, cfg.batch_size);
                let gens = generate_ids(base, &prompts, &g)?;
                let mut seqs = Vec::new();
                let mut owner = Vec::new();
                rejection = (0..eval_prompts.len())
                    .map(|_| RejectionPrompt { accepted: vec![], drawn: m })
                    .collect();
                for (k, gen_) in gens.iter().enumerate() {
                    let text = response_text(base, &gen_.token_ids, gen_.finish_reason)?;
                    if gen_.token_ids.is_empty() || det.is_unwanted(&text) {
                        continue;
                    }
                    let mut ids = gen_.prompt_ids.clone();
                    ids.extend_from_slice(&gen_.token_ids);
                    owner.push(k / m);
                    seqs.push((ids, gen_.prompt_ids.len()));
                }
                let (ids, starts): (Vec<_>, Vec<_>) = seqs.into_iter().unzip();
                let lps = score_sum(base, &ids, &starts, cfg.score_batch_size)?;
                for ((ids, start), (lp, o)) in
                    ids.into_iter().zip(starts).zip(lps.into_iter().zip(owner))
                {
                    rejection[o].accepted.push(ScoredSeq { ids, start, base_logp: lp });
                }
                facts.rejection_samples = prompts.len();
                let accepted: usize = rejection.iter().map(|r| r.accepted.len()).sum();
                facts.rejection_unwanted_rate =
                    Estimate::proportion(prompts.len() - accepted, prompts.len());
                facts.prompts_without_accepted_sample =
                    rejection.iter().filter(|r| r.accepted.is_empty()).count();
                let neg_log_z: Vec<f64> = rejection
                    .iter()
                    .filter(|r| !r.accepted.is_empty())
                    .map(|r| -((r.accepted.len() as f64) / r.drawn as f64).ln())
                    .collect();
                facts.kl_ideal_base = Estimate::mean_of(&neg_log_z);
            }
            (None, _) => {
                for metric in ["unwanted_rate", "kl_ideal"] {
                    skipped.push(Skipped {
                        metric: metric.into(),
                        reason: "the task has no unwanted-word list, so samples cannot be \
                                 classified as unwanted (p* is unknown)"
                            .into(),
                    });
                }
            }
            (Some(_), true) => {
                for metric in ["unwanted_rate", "kl_ideal"] {
                    skipped.push(Skipped {
                        metric: metric.into(),
                        reason: "the task has no held-out (eval) prompts".into(),
                    });
                }
            }
        }
        // Control prompts: samples of p°.
        let mut control = Vec::new();
        if task.control_prompts.is_empty() {
            skipped.push(Skipped {
                metric: "kl_control".into(),
                reason: "the task has no control prompts (held-out prompts with clean responses)"
                    .into(),
            });
        } else {
            let m = cfg.control_samples_per_prompt.max(1);
            let prompts: Vec<Vec<u32>> = task
                .control_prompts
                .iter()
                .map(|p| tok.encode(p, true))
                .collect::<amend_models::Result<Vec<_>>>()?
                .into_iter()
                .flat_map(|ids| std::iter::repeat_n(ids, m))
                .collect();
            let g =
                sampling_config(base, cfg.max_new_tokens, 1.0, seed ^ 0xc017_0001, cfg.batch_size);
            let gens = generate_ids(base, &prompts, &g)?;
            let mut ids = Vec::new();
            let mut starts = Vec::new();
            for gen_ in &gens {
                let mut s = gen_.prompt_ids.clone();
                s.extend_from_slice(&gen_.token_ids);
                starts.push(gen_.prompt_ids.len());
                ids.push(s);
            }
            let lps = score_sum(base, &ids, &starts, cfg.score_batch_size)?;
            let mut per_prompt: Vec<Vec<ScoredSeq>> = vec![vec![]; task.control_prompts.len()];
            for (k, ((ids, start), lp)) in ids.into_iter().zip(starts).zip(lps).enumerate() {
                if ids.len() > start {
                    per_prompt[k / m].push(ScoredSeq { ids, start, base_logp: lp });
                }
            }
            facts.control_samples = gens.len();
            control = per_prompt;
        }
        // Held-out texts (those longer than the model's positions are left out).
        let max_len = crate::annotate::max_positions(base);
        let eos = tok.eos_token_ids().first().copied();
        let mut heldout = Vec::new();
        for (p, r) in &task.heldout_texts {
            let mut ids = tok.encode(p, true)?;
            let start = ids.len();
            ids.extend(tok.encode(r, false)?);
            ids.extend(eos);
            if ids.len() > start && start > 0 && ids.len() <= max_len {
                heldout.push((ids, start));
            }
        }
        let mut heldout_unwanted = Vec::new();
        for r in task.responses.iter().filter(|r| r.split == Split::Eval) {
            let (prompt_ids, response_ids, weights) = crate::user_data::encode_annotated(tok, r)?;
            let start = prompt_ids.len();
            let mut ids = prompt_ids;
            ids.extend_from_slice(&response_ids);
            if r.is_unwanted() {
                let neg: Vec<usize> =
                    weights.iter().enumerate().filter(|(_, w)| **w < 0).map(|(i, _)| i).collect();
                if !neg.is_empty() && start > 0 && ids.len() <= max_len {
                    facts.heldout_unwanted_tokens += neg.len();
                    heldout_unwanted.push((ids, start, neg));
                }
            } else if ids.len() > start && start > 0 && ids.len() <= max_len {
                heldout.push((ids, start));
            }
        }
        facts.heldout_texts = heldout.len();
        if heldout.is_empty() {
            skipped.push(Skipped {
                metric: "heldout_perplexity".into(),
                reason: "the task has no clean held-out responses".into(),
            });
        }
        if heldout_unwanted.is_empty() {
            skipped.push(Skipped {
                metric: "unwanted_token_logprob".into(),
                reason: "the task has no annotated unwanted held-out responses".into(),
            });
        }
        facts.seconds = t0.elapsed().as_secs_f64();
        Ok(Evaluator {
            cfg,
            seed,
            detector: task.detector.clone(),
            eval_prompts,
            rejection,
            control,
            heldout,
            heldout_unwanted,
            facts,
            skipped,
        })
    }

    /// What was established about `p°`.
    pub fn base_facts(&self) -> &BaseFacts {
        &self.facts
    }

    /// The metrics that cannot be computed on this task, with the reason.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The settings.
    pub fn config(&self) -> &EvalConfig {
        &self.cfg
    }

    /// Computes every available metric of `model` (see the [module docs](self)).
    ///
    /// # Errors
    /// Model errors.
    pub fn evaluate<M: CausalLm + ?Sized>(&self, model: &M) -> Result<PointMetrics> {
        let t0 = std::time::Instant::now();
        let mut out = PointMetrics::default();
        let cfg = &self.cfg;
        // Unwanted rate from samples of p_new.
        if let Some(det) = &self.detector
            && !self.eval_prompts.is_empty()
        {
            let m = cfg.samples_per_prompt.max(1);
            let prompts: Vec<Vec<u32>> = self
                .eval_prompts
                .iter()
                .flat_map(|(_, ids)| std::iter::repeat_n(ids.clone(), m))
                .collect();
            let g = sampling_config(model, cfg.max_new_tokens, 1.0, self.seed + 1, cfg.batch_size);
            let gens = generate_ids(model, &prompts, &g)?;
            let mut hits = 0;
            for (k, gen_) in gens.iter().enumerate() {
                let text = response_text(model, &gen_.token_ids, gen_.finish_reason)?;
                hits += usize::from(det.is_unwanted(&text));
                if out.examples.len() < cfg.examples && k % m < 2 {
                    out.examples.push((self.eval_prompts[k / m].0.clone(), text));
                }
            }
            out.unwanted_rate = Estimate::proportion(hits, gens.len());
        }
        // KL(p*‖p_new) from the rejection samples.
        if !self.rejection.is_empty() {
            let (ids, starts): (Vec<Vec<u32>>, Vec<usize>) = self
                .rejection
                .iter()
                .flat_map(|r| r.accepted.iter().map(|s| (s.ids.clone(), s.start)))
                .unzip();
            let lps = score_sum(model, &ids, &starts, cfg.score_batch_size)?;
            let mut it = lps.into_iter();
            let prompts: Vec<(Vec<(f64, f64)>, usize)> = self
                .rejection
                .iter()
                .map(|r| {
                    let pairs = r
                        .accepted
                        .iter()
                        .map(|s| (s.base_logp, it.next().unwrap_or(f64::NAN)))
                        .collect();
                    (pairs, r.drawn)
                })
                .collect();
            out.kl_ideal = kl_ideal_estimate(&prompts);
        }
        // KL(p°‖p_new) on control prompts.
        if !self.control.is_empty() {
            let (ids, starts): (Vec<Vec<u32>>, Vec<usize>) = self
                .control
                .iter()
                .flat_map(|c| c.iter().map(|s| (s.ids.clone(), s.start)))
                .unzip();
            let lps = score_sum(model, &ids, &starts, cfg.score_batch_size)?;
            let mut it = lps.into_iter();
            let per_prompt: Vec<f64> = self
                .control
                .iter()
                .filter(|c| !c.is_empty())
                .map(|c| {
                    c.iter().map(|s| s.base_logp - it.next().unwrap_or(f64::NAN)).sum::<f64>()
                        / c.len() as f64
                })
                .collect();
            out.kl_control = Estimate::mean_of(&per_prompt);
        }
        // Held-out perplexity.
        if !self.heldout.is_empty() {
            let (ids, starts): (Vec<Vec<u32>>, Vec<usize>) = self.heldout.iter().cloned().unzip();
            let scores = score_ids(model, &ids, &starts, cfg.score_batch_size)?;
            out.heldout_perplexity = Some(amend_models::corpus_perplexity(&scores));
        }
        if !self.heldout_unwanted.is_empty() {
            let ids: Vec<Vec<u32>> = self.heldout_unwanted.iter().map(|h| h.0.clone()).collect();
            let starts: Vec<usize> = self.heldout_unwanted.iter().map(|h| h.1).collect();
            let scores = score_ids(model, &ids, &starts, cfg.score_batch_size)?;
            let lps: Vec<f64> = scores
                .iter()
                .zip(&self.heldout_unwanted)
                .flat_map(|(s, h)| {
                    h.2.iter().filter_map(|&i| s.logprobs.get(i).map(|&x| f64::from(x)))
                })
                .collect();
            out.unwanted_token_logprob = Estimate::mean_of(&lps);
        }
        out.eval_seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimator against the exact KL of a categorical toy: p° over 6 outcomes, U = {0, 1}.
    #[test]
    fn kl_ideal_estimate_matches_the_exact_value() {
        use rand::{RngExt, SeedableRng};
        let p0 = [0.15, 0.05, 0.3, 0.2, 0.2, 0.1];
        let pn = [0.01, 0.01, 0.2, 0.38, 0.3, 0.1];
        let z: f64 = p0[2..].iter().sum();
        let exact: f64 = (2..6).map(|y| (p0[y] / z) * ((p0[y] / z) / pn[y]).ln()).sum();
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(7);
        let (prompts_n, m) = (400, 64);
        let prompts: Vec<(Vec<(f64, f64)>, usize)> = (0..prompts_n)
            .map(|_| {
                let acc = (0..m)
                    .filter_map(|_| {
                        let u: f64 = rng.random();
                        let mut c = 0.0;
                        let y = p0.iter().position(|&p| {
                            c += p;
                            u < c
                        })?;
                        (y >= 2).then(|| (p0[y].ln(), pn[y].ln()))
                    })
                    .collect();
                (acc, m)
            })
            .collect();
        let e = kl_ideal_estimate(&prompts).unwrap();
        // The plug-in −log Ẑ over-estimates by about (1 − Z)/(2mZ) ≈ 0.002.
        assert!((e.value - exact).abs() < 4.0 * e.se + 0.003, "{e:?} vs {exact}");
        assert!(e.se < 0.01);
        // With p_new = p° only −log Ẑ remains, close to KL(p*‖p°) = −log Z.
        let same: Vec<(Vec<(f64, f64)>, usize)> = prompts
            .iter()
            .map(|(acc, m)| (acc.iter().map(|&(b, _)| (b, b)).collect(), *m))
            .collect();
        let e0 = kl_ideal_estimate(&same).unwrap();
        assert!((e0.value + z.ln()).abs() < 4.0 * e0.se + 0.003, "{e0:?} vs {}", -z.ln());
        // Prompts without an accepted sample are left out.
        assert!(kl_ideal_estimate(&[(vec![], 8)]).is_none());
    }

    #[test]
    fn an_undefined_standard_error_survives_json() {
        // One unit: the standard error is undefined (NaN); JSON writes null and reads NaN back.
        let e = Estimate::mean_of(&[0.25]).unwrap();
        assert!(e.se.is_nan());
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"value":0.25,"se":null,"n":1}"#);
        let back: Estimate = serde_json::from_str(&json).unwrap();
        assert_eq!((back.value, back.n), (0.25, 1));
        assert!(back.se.is_nan());
    }

    #[test]
    fn estimates() {
        let e = Estimate::mean_of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((e.value, e.n), (2.0, 3));
        assert!((e.se - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let p = Estimate::proportion(1, 4).unwrap();
        assert!((p.se - (0.25f64 * 0.75 / 4.0).sqrt()).abs() < 1e-12);
        assert!(Estimate::mean_of(&[]).is_none());
        assert!(Estimate::proportion(0, 0).is_none());
    }
}
