//! The `pairs` regime's minimal pairs: each unwanted training response paired with *the same
//! response* with its unwanted words taken out, instead of an unrelated clean response of the
//! same prompt.
//!
//! In the synthetic grammar an unwanted word either takes an adjective slot (`"the zonk fox
//! sleeps."`) or opens the response as an interjection (`"wibble! the fox sleeps."`). The
//! counterpart replaces a slot word by a clean adjective (drawn with a seeded RNG) and drops an
//! interjection with its `!`, so both sides of a pair are sentences of the grammar that differ
//! only where the unwanted word was: the minimal pairs of DeTox's data (the same continuation
//! with and without the toxic content). The token-level methods keep the usual data; the
//! sequence-level methods and ProFS pair each unwanted response with its counterpart.

use amend_models::{CausalLm, score_ids};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::IndexedRandom;

use crate::annotate::{Sample, SampleOrigin, TrainingData};
use crate::detector::UnwantedWords;
use crate::{Error, Result};

/// `text` with every unwanted word of `detector` taken out: an interjection (`"wibble! "`) is
/// removed with its `!` and the space before it, any other occurrence replaced by one of
/// `replacements` (drawn from `rng`). Returns `None` when `text` has no unwanted word.
pub fn counterpart_text(
    text: &str,
    detector: &UnwantedWords,
    replacements: &[&str],
    rng: &mut Xoshiro256PlusPlus,
) -> Option<String> {
    let spans = detector.spans(text);
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in spans {
        if s.start < at {
            continue;
        }
        let interjection = text[s.end..].starts_with('!');
        if interjection {
            let start = if text[..s.start].ends_with(' ') { s.start - 1 } else { s.start };
            out.push_str(&text[at..start]);
            at = s.end + 1;
        } else {
            out.push_str(&text[at..s.start]);
            out.push_str(replacements.choose(rng).copied().unwrap_or("good"));
            at = s.end;
        }
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// The data of the sequence-level methods in the `pairs` regime: `data` with, in every usable
/// group, the clean responses replaced by the counterparts of its unwanted responses (in the
/// same order, so that DPO's and ProFS's `j`-th pair is an unwanted response and its own
/// counterpart). Counterparts are tokenised like the samples (ending with the end-of-sequence
/// token when the original did) and scored by `base` for their reference log-probabilities.
/// Negative-prompt samples are kept; the counts of `stats` describe the new data (the
/// counterparts are counted as clean policy samples).
///
/// # Errors
/// [`Error::NoTokenizer`]; [`Error::InvalidInput`] when no unwanted response has a
/// counterpart; model errors of scoring.
pub fn minimal_pair_data<M: CausalLm + ?Sized>(
    base: &M,
    data: &TrainingData,
    detector: &UnwantedWords,
    seed: u64,
) -> Result<TrainingData> {
    let tok = base.tokenizer().ok_or(Error::NoTokenizer { op: "minimal_pair_data" })?;
    let eos = tok.eos_token_ids().first().copied();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x9a12_5000_0000_0013);
    let mut out = data.clone();
    let mut new_samples = Vec::new();
    for g in data.usable_groups() {
        let mut clean = Vec::new();
        for &u in &data.groups[g].unwanted {
            let s = &data.samples[u];
            let Some(text) = counterpart_text(&s.text, detector, crate::synthetic::ADJ, &mut rng)
            else {
                continue;
            };
            let mut response_ids = tok.encode(&text, false)?;
            let stopped = eos.is_some_and(|e| s.response_ids.last() == Some(&e));
            if let (true, Some(e)) = (stopped, eos) {
                response_ids.push(e);
            }
            if response_ids.is_empty() {
                continue;
            }
            clean.push(out.samples.len() + new_samples.len());
            new_samples.push(Sample {
                group: g,
                origin: SampleOrigin::Policy,
                prompt_ids: s.prompt_ids.clone(),
                weights: vec![1; response_ids.len()],
                response_ids,
                text,
                unwanted: false,
                ref_logp: 0.0,
            });
        }
        // A group whose unwanted responses all lack a counterpart keeps its clean responses.
        if clean.len() == data.groups[g].unwanted.len() {
            out.groups[g].clean = clean;
        }
    }
    if new_samples.is_empty() {
        return Err(Error::InvalidInput {
            op: "minimal_pair_data",
            name: "data".into(),
            reason: "no unwanted training response has a detected unwanted word".into(),
        });
    }
    let seqs: Vec<Vec<u32>> = new_samples.iter().map(Sample::full_ids).collect();
    let starts: Vec<usize> = new_samples.iter().map(|s| s.prompt_ids.len()).collect();
    for (s, sc) in new_samples.iter_mut().zip(score_ids(base, &seqs, &starts, 128)?) {
        s.ref_logp = sc.sum_logprob();
    }
    out.stats.policy_samples += new_samples.len();
    out.samples.extend(new_samples);
    // The counts of what the sequence-level methods see.
    let (mut responses, mut tokens, mut negative) = (0, 0, 0);
    for g in out.usable_groups() {
        let grp = &out.groups[g];
        for &i in grp.clean.iter().chain(&grp.unwanted) {
            let w = &out.samples[i].weights;
            responses += 1;
            tokens += w.len();
            negative += w.iter().filter(|&&x| x < 0).count();
        }
    }
    out.stats.usable_responses = responses;
    out.stats.response_tokens = tokens;
    out.stats.negative_tokens = negative;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counterparts_differ_only_where_the_unwanted_word_was() {
        let det = UnwantedWords::new(["zonk", "wibble"]).unwrap();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(0);
        let c = counterpart_text(" the zonk fox sleeps.", &det, &["red"], &mut rng);
        assert_eq!(c.as_deref(), Some(" the red fox sleeps."));
        let c = counterpart_text(" wibble! the fox is zonk.", &det, &["red"], &mut rng);
        assert_eq!(c.as_deref(), Some(" the fox is red."));
        assert_eq!(counterpart_text(" the fox.", &det, &["red"], &mut rng), None);
        let c = counterpart_text("wibble! it is.", &det, &["red"], &mut rng).unwrap();
        assert_eq!(c, " it is.");
        assert!(!det.is_unwanted(&c));
    }
}
