//! Pure metric definitions (no model): the CounterFact probability comparison, token accuracy,
//! EasyEdit locality, the harmonic-mean edit score and n-gram-entropy fluency (spec Part C).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The protocol family a number belongs to (MET-1). Aggregates never mix families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Protocol {
    /// MEMIT CounterFact: probability comparison of `target_new` against `target_true`.
    #[serde(rename = "memit-prob")]
    MemitProb,
    /// MEMIT zsRE: teacher-forced token accuracy; specificity is absolute correctness.
    #[serde(rename = "memit-tokacc")]
    MemitTokAcc,
    /// EasyEdit: teacher-forced token accuracy; locality is *unchanged* predictions.
    #[serde(rename = "easyedit-tokacc")]
    EasyEditTokAcc,
}

impl Protocol {
    /// The tag written next to every number (`memit-prob`, `memit-tokacc`, `easyedit-tokacc`).
    pub fn tag(self) -> &'static str {
        match self {
            Protocol::MemitProb => "memit-prob",
            Protocol::MemitTokAcc => "memit-tokacc",
            Protocol::EasyEditTokAcc => "easyedit-tokacc",
        }
    }
}

/// Harmonic mean of the components of one protocol family (MET-3), all on the same scale.
///
/// ```text
/// S = n / Σ_i 1/x_i          (S = 0 if any x_i = 0)
/// ```
///
/// # Errors
/// [`Error::MetricDomain`] for an empty list or a negative or NaN component.
///
/// # Example
///
/// ```
/// use amend_edit::metrics::hmean;
/// assert!((hmean(&[98.9, 88.6, 73.7])? - 85.7966).abs() < 1e-4);
/// assert_eq!(hmean(&[1.0, 0.5, 0.0])?, 0.0);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn hmean(xs: &[f64]) -> Result<f64> {
    if xs.is_empty() {
        return Err(Error::MetricDomain {
            op: "hmean",
            name: "components".into(),
            value: f64::NAN,
            reason: "no components",
        });
    }
    for (i, &x) in xs.iter().enumerate() {
        if x.is_nan() || x < 0.0 {
            return Err(Error::MetricDomain {
                op: "hmean",
                name: format!("component {i}"),
                value: x,
                reason: "edit-score components must be non-negative numbers",
            });
        }
    }
    if xs.contains(&0.0) {
        return Ok(0.0);
    }
    Ok(xs.len() as f64 / xs.iter().map(|x| 1.0 / x).sum::<f64>())
}

/// CounterFact scores of one record (fractions in `[0, 1]`; magnitudes in `[−1, 1]`). A part
/// without prompts is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbRecord {
    /// Efficacy: share of rewrite prompts with `NLL(new) < NLL(true)`.
    pub es: Option<f64>,
    /// Paraphrase: the same over paraphrase prompts.
    pub ps: Option<f64>,
    /// Neighbourhood: share of neighbourhood prompts with `NLL(true) < NLL(new)`.
    pub ns: Option<f64>,
    /// Efficacy magnitude: mean `p(new) − p(true)` (per-token geometric means) on rewrite prompts.
    pub em: Option<f64>,
    /// Paraphrase magnitude.
    pub pm: Option<f64>,
    /// Neighbourhood magnitude: mean `p(true) − p(new)`.
    pub nm: Option<f64>,
}

fn share(xs: &[(f64, f64)]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().filter(|(a, b)| a < b).count() as f64 / xs.len() as f64)
}

fn magnitude(xs: &[(f64, f64)]) -> Option<f64> {
    (!xs.is_empty())
        .then(|| xs.iter().map(|(a, b)| (-a).exp() - (-b).exp()).sum::<f64>() / xs.len() as f64)
}

/// CounterFact scores of one record from teacher-forced mean NLLs (spec C.2; MEMIT
/// `experiments/summarize.py`).
///
/// ```text
/// NLL(p, a) = (1/n) Σ_j −log p(a_j | p, a_<j)     a = tokens of " " + answer
/// ES = mean 1[NLL(p, new) < NLL(p, true)] over rewrite prompts (strict: ties fail)
/// PS = the same over paraphrase prompts
/// NS = mean 1[NLL(p, true) < NLL(p, new)] over neighbourhood prompts
/// EM, PM = mean exp(−NLL_new) − exp(−NLL_true);  NM = mean exp(−NLL_true) − exp(−NLL_new)
/// ```
///
/// `rewrite` and `paraphrase` hold `(NLL_new, NLL_true)`; `neighbourhood` holds
/// `(NLL_true, NLL_new)` (the order of the comparison).
///
/// # Example
///
/// The record of spec C.7:
///
/// ```
/// use amend_edit::metrics::counterfact_record;
/// let r = counterfact_record(
///     &[(0.5, 2.0)],
///     &[(1.2, 0.9), (0.7, 1.5)],
///     &[(0.3, 1.1), (0.8, 0.6), (0.2, 2.0), (0.4, 0.9)],
/// );
/// assert_eq!((r.es, r.ps, r.ns), (Some(1.0), Some(0.5), Some(0.75)));
/// assert!((r.em.unwrap() - 0.471195).abs() < 1e-6);
/// ```
pub fn counterfact_record(
    rewrite: &[(f64, f64)],
    paraphrase: &[(f64, f64)],
    neighbourhood: &[(f64, f64)],
) -> ProbRecord {
    ProbRecord {
        es: share(rewrite),
        ps: share(paraphrase),
        ns: share(neighbourhood),
        em: magnitude(rewrite),
        pm: magnitude(paraphrase),
        nm: magnitude(neighbourhood),
    }
}

/// Teacher-forced token accuracy (spec C.3): the share of answer tokens that are the argmax
/// prediction given the prompt and the earlier answer tokens.
///
/// ```text
/// acc = (1/n) Σ_j 1[argmax_v logits(p ⊕ a_<j)_v = a_j]
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] for different lengths or no tokens.
///
/// # Example
///
/// ```
/// use amend_edit::metrics::token_accuracy;
/// assert_eq!(token_accuracy(&[2, 3], &[2, 3])?, 1.0);
/// assert_eq!(token_accuracy(&[2, 5], &[2, 3])?, 0.5);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn token_accuracy(predictions: &[u32], labels: &[u32]) -> Result<f64> {
    if predictions.len() != labels.len() || labels.is_empty() {
        return Err(Error::invalid(
            "token_accuracy",
            "labels",
            format!("{} predictions for {} labels", predictions.len(), labels.len()),
        ));
    }
    let hit = predictions.iter().zip(labels).filter(|(a, b)| a == b).count();
    Ok(hit as f64 / labels.len() as f64)
}

/// EasyEdit locality (spec C.3): the share of answer positions whose argmax prediction is the
/// same after the edit as before. This measures **unchanged predictions**, not correctness (for
/// correctness use [`token_accuracy`] against the answer).
///
/// # Errors
/// [`Error::InvalidInput`] for different lengths or no tokens.
///
/// # Example
///
/// The example of spec C.7 (EasyEdit README: 66.67):
///
/// ```
/// use amend_edit::metrics::locality_unchanged;
/// let l = locality_unchanged(&[29, 234, 334], &[29, 234, 333])?;
/// assert!((l - 2.0 / 3.0).abs() < 1e-12);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn locality_unchanged(pre: &[u32], post: &[u32]) -> Result<f64> {
    if pre.len() != post.len() || pre.is_empty() {
        return Err(Error::invalid(
            "locality_unchanged",
            "post",
            format!("{} pre-edit predictions, {} post-edit", pre.len(), post.len()),
        ));
    }
    let same = pre.iter().zip(post).filter(|(a, b)| a == b).count();
    Ok(same as f64 / pre.len() as f64)
}

/// How fluency splits a generation into words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WordTokenizer {
    /// Split on whitespace.
    Whitespace,
    /// Split on whitespace and split off each punctuation character as its own word (close to
    /// nltk `word_tokenize` on plain text; exact parity only for punctuation-free lower-case
    /// text).
    #[default]
    Punctuation,
}

impl WordTokenizer {
    /// The words of `text`.
    pub fn words(self, text: &str) -> Vec<String> {
        match self {
            WordTokenizer::Whitespace => text.split_whitespace().map(str::to_string).collect(),
            WordTokenizer::Punctuation => {
                let mut out = Vec::new();
                for w in text.split_whitespace() {
                    let mut cur = String::new();
                    for ch in w.chars() {
                        if ch.is_ascii_punctuation() {
                            if !cur.is_empty() {
                                out.push(std::mem::take(&mut cur));
                            }
                            out.push(ch.to_string());
                        } else {
                            cur.push(ch);
                        }
                    }
                    if !cur.is_empty() {
                        out.push(cur);
                    }
                }
                out
            }
        }
    }
}

/// Entropy (bits) of the word n-gram distribution of one text (spec C.4).
///
/// ```text
/// H_n = −Σ_g f_g log₂ f_g      f_g = relative frequency of n-gram g
/// ```
///
/// 0 when the text has fewer than `n` words.
///
/// ```
/// use amend_edit::metrics::ngram_entropy;
/// let w: Vec<&str> = "the cat sat on the mat the cat sat".split(' ').collect();
/// assert!((ngram_entropy(&w, 2) - 2.5).abs() < 1e-12);
/// ```
pub fn ngram_entropy<S: AsRef<str>>(words: &[S], n: usize) -> f64 {
    if n == 0 || words.len() < n {
        return 0.0;
    }
    let mut counts: HashMap<Vec<&str>, usize> = HashMap::new();
    for win in words.windows(n) {
        *counts.entry(win.iter().map(AsRef::as_ref).collect()).or_default() += 1;
    }
    let total = (words.len() - n + 1) as f64;
    -counts.values().map(|&c| c as f64 / total).map(|f| f * f.log2()).sum::<f64>()
}

/// Generation entropy of one text (MEMIT / EasyEdit fluency, spec C.4): the mean of the weighted
/// bigram and trigram entropies.
///
/// ```text
/// GE(text) = mean(w₂·H₂, w₃·H₃)      (w₂, w₃) = (2/3, 4/3) by default
/// ```
///
/// Papers report the mean over generations ×100.
///
/// ```
/// use amend_edit::metrics::{generation_entropy, WordTokenizer};
/// let ge = generation_entropy("the cat sat on the mat the cat sat", WordTokenizer::Whitespace, (2.0 / 3.0, 4.0 / 3.0));
/// assert!((ge - 2.514427).abs() < 1e-6);
/// ```
pub fn generation_entropy(text: &str, tokenizer: WordTokenizer, weights: (f64, f64)) -> f64 {
    let words = tokenizer.words(text);
    (weights.0 * ngram_entropy(&words, 2) + weights.1 * ngram_entropy(&words, 3)) / 2.0
}

/// Mean and standard deviation (population) of a list, `None` when empty.
pub(crate) fn mean_std(xs: &[f64]) -> Option<Stat> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Some(Stat { mean, std: var.sqrt(), count: xs.len() })
}

/// A mean with its standard deviation over records.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Population standard deviation over records.
    pub std: f64,
    /// Records that had this metric.
    pub count: usize,
}

impl Stat {
    /// The same statistic scaled by `f` (×100 for percentages).
    pub fn scaled(self, f: f64) -> Stat {
        Stat { mean: self.mean * f, std: self.std * f, count: self.count }
    }
}
