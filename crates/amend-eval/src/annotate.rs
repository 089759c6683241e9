//! Training data of a comparison: responses sampled from the base model `p°`, annotated token by
//! token, grouped by prompt, plus the given responses of user data.
//!
//! # Annotation
//!
//! A response is unwanted when the detector finds an unwanted word in its text (see
//! [`UnwantedWords`]). Its token weights are `w = −1` on every token whose decoded text overlaps
//! an unwanted word and `+1` on every other response token (the end-of-sequence token included);
//! prompt tokens have no weight (the losses see `0`). Clean responses are `+1` throughout.
//!
//! Token offsets come from decoding growing prefixes of the response (`decode(ids[..k])`), so
//! they are exact for any tokenizer whose decoding is prefix-stable (byte-level BPE on text that
//! splits at character boundaries, as here); user data with character spans is aligned with the
//! tokenizer's own offsets instead.
//!
//! # Groups
//!
//! Samples are grouped by prompt. A [`PromptGroup`] is *usable* when it has at least one clean
//! and at least one unwanted response: every method can then learn from it (DPO needs a pair,
//! CP a positive and a negative, RRHF a reward gap). Only usable groups are trained on, so every
//! method sees exactly the same responses per step; NEAT additionally sees the group's
//! negative-prompt samples.

use std::collections::BTreeMap;

use amend_models::{CausalLm, FinishReason, GenerationConfig, generate_ids, score_ids};
use serde::{Deserialize, Serialize};

use crate::detector::UnwantedWords;
use crate::task::{Split, SuppressionTask};
use crate::{Error, Result};

/// Where a training response comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleOrigin {
    /// Sampled from `p°` under the plain prompt.
    Policy,
    /// Sampled from `p°` under the negative prefix + prompt (scored without the prefix).
    NegPrompt,
    /// Given in the data.
    Dataset,
}

/// One annotated response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Index of its [`PromptGroup`] in [`TrainingData::groups`].
    pub group: usize,
    /// Where it comes from.
    pub origin: SampleOrigin,
    /// Token ids of the prompt it is scored after (with the tokenizer's special tokens; never
    /// the negative prefix).
    pub prompt_ids: Vec<u32>,
    /// Token ids of the response (ending with the end-of-sequence token when it stopped).
    pub response_ids: Vec<u32>,
    /// The response text.
    pub text: String,
    /// Token weights of the response tokens: −1 unwanted, +1 otherwise.
    pub weights: Vec<i8>,
    /// Whether the response contains unwanted content.
    pub unwanted: bool,
    /// `log p°(response | prompt)`, summed over the response tokens.
    pub ref_logp: f64,
}

impl Sample {
    /// `prompt_ids ++ response_ids`.
    pub fn full_ids(&self) -> Vec<u32> {
        let mut v = self.prompt_ids.clone();
        v.extend_from_slice(&self.response_ids);
        v
    }
}

/// The samples of one prompt, by kind (indices into [`TrainingData::samples`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptGroup {
    /// The prompt.
    pub prompt: String,
    /// Clean responses (policy or dataset).
    pub clean: Vec<usize>,
    /// Unwanted responses (policy or dataset).
    pub unwanted: Vec<usize>,
    /// Negative-prompt samples (NEAT only).
    pub negative: Vec<usize>,
}

impl PromptGroup {
    /// Whether the group has a clean and an unwanted response.
    pub fn usable(&self) -> bool {
        !self.clean.is_empty() && !self.unwanted.is_empty()
    }
}

/// Counts describing the training data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Policy samples drawn.
    pub policy_samples: usize,
    /// Of which unwanted.
    pub policy_unwanted: usize,
    /// Negative-prompt samples drawn.
    pub negative_samples: usize,
    /// Of which unwanted.
    pub negative_unwanted: usize,
    /// Given dataset responses used for training.
    pub dataset_samples: usize,
    /// Given responses left out because prompt + response exceed the model's positions.
    pub too_long: usize,
    /// Prompt groups with a clean and an unwanted response.
    pub usable_groups: usize,
    /// Responses in usable groups (clean + unwanted).
    pub usable_responses: usize,
    /// Unwanted (`w = −1`) tokens in usable groups.
    pub negative_tokens: usize,
    /// Response tokens (`w ≠ 0`) in usable groups.
    pub response_tokens: usize,
    /// Mean `p°(y_t | y_<t)` over the first tokens of the unwanted spans in usable groups (the
    /// token where the model chooses an unwanted word; the rest of a word split into several
    /// tokens is nearly certain once it has begun): how likely the base model finds the
    /// unwanted choices it is trained against (NaN without any).
    #[serde(default = "nan", deserialize_with = "crate::metrics::f64_or_nan")]
    pub unwanted_start_mass: f64,
    /// Fraction of those first tokens that are the base model's most likely token at their
    /// position (the TNT paper's greedy negatives have 1; NaN without any).
    #[serde(default = "nan", deserialize_with = "crate::metrics::f64_or_nan")]
    pub unwanted_start_top1: f64,
    /// Wall time of sampling and annotation.
    pub seconds: f64,
}

/// Statistics missing from older files read back as undefined (serde_json writes NaN as `null`,
/// which [`crate::metrics::f64_or_nan`] reads back as NaN).
fn nan() -> f64 {
    f64::NAN
}

/// How the training data is sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Samples from `p°` per training prompt.
    pub samples_per_prompt: usize,
    /// Samples under the negative prefix per training prompt (NEAT).
    pub negative_samples_per_prompt: usize,
    /// Longest response in tokens.
    pub max_new_tokens: usize,
    /// Sampling temperature (1 samples `p°` itself).
    pub temperature: f64,
    /// Rows decoded together.
    pub batch_size: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            samples_per_prompt: 8,
            negative_samples_per_prompt: 4,
            max_new_tokens: 40,
            temperature: 1.0,
            batch_size: 256,
        }
    }
}

/// The annotated training data of a comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingData {
    /// Every sample.
    pub samples: Vec<Sample>,
    /// Samples grouped by prompt (all groups; see [`TrainingData::usable_groups`]).
    pub groups: Vec<PromptGroup>,
    /// Token ids that start an unwanted span somewhere in the data (the explicit candidates of
    /// Welleck unlikelihood).
    pub unwanted_token_ids: Vec<u32>,
    /// Counts.
    pub stats: DataStats,
}

impl TrainingData {
    /// Indices of the usable groups.
    pub fn usable_groups(&self) -> Vec<usize> {
        (0..self.groups.len()).filter(|&g| self.groups[g].usable()).collect()
    }
}

/// Byte offsets `[start, end)` of each token of `ids` in `decode(ids)`, from prefix decodes.
///
/// # Errors
/// [`Error::Model`] for a tokenizer error.
pub fn token_offsets(tok: &amend_models::Tokenizer, ids: &[u32]) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::with_capacity(ids.len());
    let mut prev = 0usize;
    for k in 1..=ids.len() {
        let len = tok.decode(&ids[..k], true)?.len();
        out.push((prev.min(len), len.max(prev)));
        prev = len.max(prev);
    }
    Ok(out)
}

/// Token weights of a response with unwanted byte `spans` in its decoded text: −1 on tokens
/// overlapping a span, +1 elsewhere.
pub fn weights_from_spans(offsets: &[(usize, usize)], spans: &[std::ops::Range<usize>]) -> Vec<i8> {
    offsets
        .iter()
        .map(|&(s, e)| {
            let hit = spans.iter().any(|r| s < r.end && e > r.start && e > s);
            if hit { -1 } else { 1 }
        })
        .collect()
}

/// The model's position limit (`usize::MAX` when it has none).
pub(crate) fn max_positions<M: CausalLm + ?Sized>(model: &M) -> usize {
    model.config().max_positions().unwrap_or(usize::MAX)
}

/// Generation settings for sampling `p°` (temperature `t`, stop at the tokenizer's EOS ids).
pub(crate) fn sampling_config<M: CausalLm + ?Sized>(
    model: &M,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
    batch_size: usize,
) -> GenerationConfig {
    let mut cfg = model.generation_config();
    cfg.max_new_tokens = max_new_tokens;
    cfg.do_sample = true;
    cfg.temperature = temperature;
    cfg.top_k = None;
    cfg.top_p = None;
    cfg.seed = seed;
    cfg.batch_size = batch_size.max(1);
    if cfg.stop_token_ids.is_empty()
        && let Some(t) = model.tokenizer()
    {
        cfg.stop_token_ids = t.eos_token_ids().to_vec();
    }
    cfg
}

/// Response ids of a generation and its text (without special tokens).
pub(crate) fn response_text<M: CausalLm + ?Sized>(
    model: &M,
    ids: &[u32],
    finish: FinishReason,
) -> Result<String> {
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: "annotate" })?;
    let body = match finish {
        FinishReason::Stop => &ids[..ids.len().saturating_sub(1)],
        FinishReason::Length => ids,
    };
    Ok(tok.decode(body, true)?)
}

/// Annotates a response with the detector: `(unwanted, weights)`.
pub(crate) fn annotate_response<M: CausalLm + ?Sized>(
    model: &M,
    detector: &UnwantedWords,
    ids: &[u32],
    text: &str,
) -> Result<(bool, Vec<i8>)> {
    let spans = detector.spans(text);
    if spans.is_empty() {
        return Ok((false, vec![1; ids.len()]));
    }
    let tok = model.tokenizer().ok_or(Error::NoTokenizer { op: "annotate" })?;
    let offsets = token_offsets(tok, ids)?;
    // `text` is the decode without the trailing stop token, which decodes to nothing, so the
    // offsets of the full ids index the same string.
    Ok((true, weights_from_spans(&offsets, &spans)))
}

/// Samples and annotates the training data of `task` from the base model `p°`.
///
/// For every training prompt: `samples_per_prompt` samples of `p°` at the configured temperature
/// and, when the task has a negative prefix, `negative_samples_per_prompt` samples under
/// `prefix + prompt` (stored with the plain prompt). Without a detector, model samples cannot
/// be annotated and only the task's given `Train` responses are used. `ref_logp` is computed by
/// a full forward pass of `p°` (the same path the metrics use).
///
/// # Errors
/// [`Error::InvalidInput`] when no prompt group ends up usable; model errors.
pub fn sample_training_data<M: CausalLm + ?Sized>(
    base: &M,
    task: &SuppressionTask,
    cfg: &SamplingConfig,
    seed: u64,
    progress: &dyn Fn(&str),
) -> Result<TrainingData> {
    let t0 = std::time::Instant::now();
    let tok = base.tokenizer().ok_or(Error::NoTokenizer { op: "sample_training_data" })?;
    let mut data = TrainingData::default();
    let mut group_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut group_index = |data: &mut TrainingData, prompt: &str| -> usize {
        *group_of.entry(prompt.to_string()).or_insert_with(|| {
            data.groups.push(PromptGroup { prompt: prompt.to_string(), ..Default::default() });
            data.groups.len() - 1
        })
    };
    if let Some(det) = &task.detector {
        let m = cfg.samples_per_prompt;
        let mut prompts = Vec::new();
        let mut jobs: Vec<(usize, SampleOrigin, Vec<u32>)> = Vec::new();
        for p in &task.train_prompts {
            let g = group_index(&mut data, p);
            let ids = tok.encode(p, true)?;
            for _ in 0..m {
                prompts.push(ids.clone());
                jobs.push((g, SampleOrigin::Policy, ids.clone()));
            }
            if let Some(prefix) = &task.negative_prefix {
                let neg_ids = tok.encode(&format!("{prefix}{p}"), true)?;
                for _ in 0..cfg.negative_samples_per_prompt {
                    prompts.push(neg_ids.clone());
                    jobs.push((g, SampleOrigin::NegPrompt, ids.clone()));
                }
            }
        }
        progress(&format!("sampling {} training responses from the base model", prompts.len()));
        let gcfg = sampling_config(base, cfg.max_new_tokens, cfg.temperature, seed, cfg.batch_size);
        let gens = generate_ids(base, &prompts, &gcfg)?;
        for ((g, origin, prompt_ids), gen_) in jobs.into_iter().zip(gens) {
            if gen_.token_ids.is_empty() {
                continue;
            }
            let text = response_text(base, &gen_.token_ids, gen_.finish_reason)?;
            let (unwanted, weights) = annotate_response(base, det, &gen_.token_ids, &text)?;
            data.samples.push(Sample {
                group: g,
                origin,
                prompt_ids,
                response_ids: gen_.token_ids,
                text,
                weights,
                unwanted,
                ref_logp: 0.0,
            });
        }
    }
    for r in task.responses.iter().filter(|r| r.split == Split::Train) {
        let g = group_index(&mut data, &r.prompt);
        let (prompt_ids, response_ids, weights) = crate::user_data::encode_annotated(tok, r)?;
        if response_ids.is_empty() {
            continue;
        }
        if prompt_ids.len() + response_ids.len() > max_positions(base) {
            data.stats.too_long += 1;
            continue;
        }
        data.samples.push(Sample {
            group: g,
            origin: SampleOrigin::Dataset,
            prompt_ids,
            response_ids,
            text: r.response.clone(),
            weights,
            unwanted: r.is_unwanted(),
            ref_logp: 0.0,
        });
    }
    // Reference log-probs by a full forward pass.
    let seqs: Vec<Vec<u32>> = data.samples.iter().map(Sample::full_ids).collect();
    let starts: Vec<usize> = data.samples.iter().map(|s| s.prompt_ids.len()).collect();
    if !seqs.is_empty() {
        let scores = score_ids(base, &seqs, &starts, 128)?;
        for (s, sc) in data.samples.iter_mut().zip(scores) {
            s.ref_logp = sc.sum_logprob();
        }
    }
    let mut firsts = std::collections::BTreeSet::new();
    for (i, s) in data.samples.iter().enumerate() {
        let grp = &mut data.groups[s.group];
        match (s.origin, s.unwanted) {
            (SampleOrigin::NegPrompt, _) => grp.negative.push(i),
            (_, true) => grp.unwanted.push(i),
            (_, false) => grp.clean.push(i),
        }
        let st = &mut data.stats;
        match s.origin {
            SampleOrigin::Policy => {
                st.policy_samples += 1;
                st.policy_unwanted += usize::from(s.unwanted);
            }
            SampleOrigin::NegPrompt => {
                st.negative_samples += 1;
                st.negative_unwanted += usize::from(s.unwanted);
            }
            SampleOrigin::Dataset => st.dataset_samples += 1,
        }
        if s.origin != SampleOrigin::NegPrompt {
            let mut prev = 1i8;
            for (&w, &id) in s.weights.iter().zip(&s.response_ids) {
                if w < 0 && prev > 0 {
                    firsts.insert(id);
                }
                prev = w;
            }
        }
    }
    data.unwanted_token_ids = firsts.into_iter().collect();
    for g in data.usable_groups() {
        let grp = &data.groups[g];
        for &i in grp.clean.iter().chain(&grp.unwanted) {
            let s = &data.samples[i];
            data.stats.usable_responses += 1;
            data.stats.response_tokens += s.weights.len();
            data.stats.negative_tokens += s.weights.iter().filter(|&&w| w < 0).count();
        }
        data.stats.usable_groups += 1;
    }
    if data.stats.usable_groups > 0 {
        let (mass, top1) = unwanted_start_view(base, &data)?;
        data.stats.unwanted_start_mass = mass;
        data.stats.unwanted_start_top1 = top1;
    }
    data.stats.seconds = t0.elapsed().as_secs_f64();
    if data.stats.usable_groups == 0 {
        return Err(Error::InvalidInput {
            op: "sample_training_data",
            name: "task".into(),
            reason: format!(
                "no training prompt has both a clean and an unwanted response ({} samples, {} \
                 unwanted); raise samples_per_prompt or add annotated responses",
                data.samples.len(),
                data.samples.iter().filter(|s| s.unwanted).count()
            ),
        });
    }
    Ok(data)
}

/// The base model's view of the first token of every unwanted span (a `w = −1` token after a
/// `w = +1` one or at the start of the response) in the unwanted responses of the usable groups:
/// the mean of `p°(y_t | y_<t)` and the fraction where `y_t` is `p°`'s argmax, `(NaN, NaN)`
/// without any. One forward pass over those responses, in batches.
///
/// # Errors
/// Model errors.
pub fn unwanted_start_view<M: CausalLm + ?Sized>(
    base: &M,
    data: &TrainingData,
) -> Result<(f64, f64)> {
    use tch::Kind;
    let _guard = tch::no_grad_guard();
    let unwanted: Vec<&Sample> = data
        .usable_groups()
        .into_iter()
        .flat_map(|g| data.groups[g].unwanted.iter().map(|&i| &data.samples[i]))
        .filter(|s| s.weights.contains(&-1))
        .collect();
    let pad = base.tokenizer().map_or(0, |t| t.pad_token_id());
    let (mut mass, mut top1, mut n) = (0.0f64, 0usize, 0usize);
    // About 32 M logits per forward pass, whatever the vocabulary.
    let longest = unwanted.iter().map(|s| s.prompt_ids.len() + s.response_ids.len()).max();
    let per_row = longest.unwrap_or(1).max(1) * base.config().vocab_size().max(1);
    let rows = ((1usize << 25) / per_row).clamp(1, 64);
    for chunk in unwanted.chunks(rows) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|s| s.full_ids()).collect();
        let batch = amend_models::tokenizer::pad_batch(
            &seqs,
            pad,
            amend_models::tokenizer::PaddingSide::Right,
            base.device(),
        )?;
        let logits = base
            .forward_with(
                &batch.input_ids,
                Some(&batch.attention_mask),
                None,
                amend_models::ForwardOptions::logits(),
            )?
            .logits
            .ok_or(Error::InvalidInput {
                op: "unwanted_start_view",
                name: "model".into(),
                reason: "the adapter returned no logits".into(),
            })?;
        let logp = logits.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
        for (row, s) in chunk.iter().enumerate() {
            for (k, (&w, &y)) in s.weights.iter().zip(&s.response_ids).enumerate() {
                // Response token k is predicted at position prompt_len + k − 1.
                let Some(pos) = (s.prompt_ids.len() + k).checked_sub(1) else { continue };
                let starts_span = w < 0 && (k == 0 || s.weights[k - 1] >= 0);
                if !starts_span {
                    continue;
                }
                let pos = pos as i64;
                let dist = logp.f_select(0, row as i64)?.f_select(0, pos)?;
                mass += dist.f_double_value(&[i64::from(y)])?.exp();
                top1 += usize::from(dist.f_argmax(0, false)?.f_int64_value(&[])? == i64::from(y));
                n += 1;
            }
        }
    }
    if n == 0 {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok((mass / n as f64, top1 as f64 / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An undefined statistic is written as `null` and read back as NaN; a file from before
    /// the field existed reads it as NaN too.
    #[test]
    fn undefined_statistics_round_trip_through_json() {
        let stats = DataStats {
            unwanted_start_mass: f64::NAN,
            unwanted_start_top1: 0.25,
            ..DataStats::default()
        };
        let json = serde_json::to_string(&stats).unwrap();
        assert!(json.contains(r#""unwanted_start_mass":null"#), "{json}");
        let back: DataStats = serde_json::from_str(&json).unwrap();
        assert!(back.unwanted_start_mass.is_nan());
        assert_eq!(back.unwanted_start_top1, 0.25);
        let mut older: serde_json::Value = serde_json::to_value(DataStats::default()).unwrap();
        let fields = older.as_object_mut().unwrap();
        fields.remove("unwanted_start_mass");
        fields.remove("unwanted_start_top1");
        let old: DataStats = serde_json::from_value(older).unwrap();
        assert!(old.unwanted_start_mass.is_nan() && old.unwanted_start_top1.is_nan());
    }

    #[test]
    fn spans_mark_overlapping_tokens() {
        // "the blorp fox" tokenised as ["the", " bl", "orp", " fox", <eos>]
        let offsets = [(0, 3), (3, 6), (6, 9), (9, 13), (13, 13)];
        let spans = [std::ops::Range { start: 4, end: 9 }];
        assert_eq!(weights_from_spans(&offsets, &spans), vec![1, -1, -1, 1, 1]);
        assert_eq!(weights_from_spans(&offsets, &[]), vec![1; 5]);
    }
}
