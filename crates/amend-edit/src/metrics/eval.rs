//! Evaluating edit requests on a model: teacher-forced answer scores, per-record evaluations and
//! their summaries in the three protocol families.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_models::{CausalLm, GenerationConfig, generate};

use super::scores::{
    ProbRecord, Protocol, Stat, WordTokenizer, counterfact_record, generation_entropy, hmean,
    locality_unchanged, mean_std, token_accuracy,
};
use crate::request::{EditRequest, answer_ids};
use crate::{Error, Result};

/// The teacher-forced score of one answer given a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerScore {
    /// Mean NLL per answer token: `(1/n) Σ_j −log p(a_j | p, a_<j)`.
    pub mean_nll: f64,
    /// Argmax prediction at each answer position.
    pub predictions: Vec<u32>,
    /// The answer tokens (of `" " + answer`).
    pub labels: Vec<u32>,
}

impl AnswerScore {
    /// Token accuracy of the predictions against the answer.
    pub fn accuracy(&self) -> f64 {
        // Invariant: predictions and labels have the same non-zero length by construction.
        token_accuracy(&self.predictions, &self.labels).unwrap_or(0.0)
    }
}

/// Teacher-forced scores of `(prompt, answer)` items: the prompt is tokenised with the model's
/// special tokens (BOS convention), the answer as `" " + answer` without; every answer token is
/// scored (spec C.2 / C.3). The model should be in eval mode.
///
/// # Errors
/// [`Error::InvalidInput`] naming the item when a prompt or answer has no tokens, or
/// `batch_size = 0`; [`Error::Model`] (`NoTokenizer`, forward errors); [`Error::Tch`].
pub fn score_answers<M: CausalLm + ?Sized>(
    model: &M,
    items: &[(&str, &str)],
    batch_size: usize,
) -> Result<Vec<AnswerScore>> {
    const OP: &str = "score_answers";
    if batch_size == 0 {
        return Err(Error::invalid(OP, "batch_size", "must be positive"));
    }
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: OP })?;
    let mut seqs = Vec::with_capacity(items.len());
    for (i, (p, a)) in items.iter().enumerate() {
        let pi = tok.encode(p, true)?;
        let ai = answer_ids(tok, a)?;
        if pi.is_empty() || ai.is_empty() {
            return Err(Error::invalid(
                OP,
                format!("items[{i}]"),
                format!("prompt {p:?} and answer {a:?} must both have tokens"),
            ));
        }
        seqs.push((pi, ai));
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let pad = i64::from(tok.pad_token_id());
    let mut out = Vec::with_capacity(items.len());
    for chunk in seqs.chunks(batch_size) {
        let t = chunk.iter().map(|(p, a)| p.len() + a.len()).max().unwrap_or(0);
        let b = chunk.len();
        let mut ids = vec![pad; b * t];
        let mut mask = vec![0i64; b * t];
        for (r, (p, a)) in chunk.iter().enumerate() {
            for (j, &x) in p.iter().chain(a).enumerate() {
                ids[r * t + j] = i64::from(x);
                mask[r * t + j] = 1;
            }
        }
        let shape = [b as i64, t as i64];
        let ids_t = Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(device)?;
        let mask_t = Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(device)?;
        let logits = model.forward(&ids_t, Some(&mask_t))?;
        for (r, (p, a)) in chunk.iter().enumerate() {
            // Positions p.len()-1 .. p.len()+a.len()-1 predict the answer tokens.
            let z = logits
                .f_get(r as i64)?
                .f_narrow(0, p.len() as i64 - 1, a.len() as i64)?
                .f_to_kind(Kind::Float)?;
            let lp = z.f_log_softmax(-1, Kind::Float)?;
            let labels =
                Tensor::f_from_slice(&a.iter().map(|&x| i64::from(x)).collect::<Vec<_>>())?
                    .f_to_device(device)?;
            let picked = lp.f_gather(1, &labels.f_unsqueeze(1)?, false)?;
            let nll = -picked.f_mean(Kind::Double)?.f_double_value(&[])?;
            let pred: Vec<i64> =
                Vec::try_from(z.f_argmax(-1, false)?.f_to_device(tch::Device::Cpu)?)?;
            out.push(AnswerScore {
                mean_nll: nll,
                predictions: pred.into_iter().map(|x| x as u32).collect(),
                labels: a.clone(),
            });
        }
    }
    Ok(out)
}

/// Fluency generations (spec C.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FluencyConfig {
    /// Tokens generated per prompt (100 in MEMIT and EasyEdit).
    pub max_new_tokens: usize,
    /// Top-k sampling (5 in MEMIT).
    pub top_k: usize,
    /// Sampling seed.
    pub seed: u64,
    /// Weights of the bigram and trigram entropies.
    pub weights: (f64, f64),
    /// Word tokenizer.
    pub tokenizer: WordTokenizer,
}

impl Default for FluencyConfig {
    fn default() -> Self {
        FluencyConfig {
            max_new_tokens: 100,
            top_k: 5,
            seed: 0,
            weights: (2.0 / 3.0, 4.0 / 3.0),
            tokenizer: WordTokenizer::default(),
        }
    }
}

/// Options of [`evaluate_requests`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalConfig {
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Fluency generations (off when `None`: they cost a generation per prompt).
    pub fluency: Option<FluencyConfig>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { batch_size: 16, fluency: None }
    }
}

/// One prompt scored against `target_new` (and `target_true` when the request has one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEval {
    /// The prompt.
    pub prompt: String,
    /// Score of `target_new`.
    pub new: AnswerScore,
    /// Score of `target_true`.
    pub true_: Option<AnswerScore>,
}

/// A probe with its own answer (locality, portability).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeEval {
    /// The prompt.
    pub prompt: String,
    /// Score of the probe's answer.
    pub answer: AnswerScore,
}

/// Everything measured for one request in one model state (before or after the edit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordEval {
    /// The rewrite prompt.
    pub rewrite: PromptEval,
    /// Paraphrase prompts.
    pub paraphrase: Vec<PromptEval>,
    /// Neighbourhood prompts (answer `target_true`; compared with `target_new`).
    pub neighbourhood: Vec<PromptEval>,
    /// Locality probes by key.
    pub locality: BTreeMap<String, Vec<ProbeEval>>,
    /// Portability probes by key.
    pub portability: BTreeMap<String, Vec<ProbeEval>>,
    /// Fluency generations.
    pub generations: Vec<String>,
    /// Mean generation entropy of the generations.
    pub fluency: Option<f64>,
}

impl RecordEval {
    /// CounterFact scores of this record (`memit-prob`); every part needs `target_true`.
    pub fn prob(&self) -> ProbRecord {
        let pairs = |xs: &[PromptEval]| -> Vec<(f64, f64)> {
            xs.iter()
                .filter_map(|e| e.true_.as_ref().map(|t| (e.new.mean_nll, t.mean_nll)))
                .collect()
        };
        let nb: Vec<(f64, f64)> =
            pairs(&self.neighbourhood).into_iter().map(|(n, t)| (t, n)).collect();
        counterfact_record(
            &pairs(std::slice::from_ref(&self.rewrite)),
            &pairs(&self.paraphrase),
            &nb,
        )
    }

    /// Token accuracy of `target_new` on the rewrite prompt (EasyEdit `rewrite_acc`, MEMIT
    /// zsRE efficacy).
    pub fn rewrite_acc(&self) -> f64 {
        self.rewrite.new.accuracy()
    }

    /// Mean token accuracy of `target_new` over the paraphrases (`rephrase_acc`), if any.
    pub fn rephrase_acc(&self) -> Option<f64> {
        let v: Vec<f64> = self.paraphrase.iter().map(|e| e.new.accuracy()).collect();
        mean_std(&v).map(|s| s.mean)
    }

    /// Mean token accuracy of the probes' own answers per portability key (correctness).
    pub fn portability_acc(&self) -> BTreeMap<String, f64> {
        probe_means(&self.portability)
    }

    /// Absolute correctness of the locality probes, averaged over all keys (MEMIT zsRE
    /// specificity).
    pub fn locality_correct(&self) -> Option<f64> {
        let v: Vec<f64> = self.locality.values().flatten().map(|p| p.answer.accuracy()).collect();
        mean_std(&v).map(|s| s.mean)
    }
}

fn probe_means(map: &BTreeMap<String, Vec<ProbeEval>>) -> BTreeMap<String, f64> {
    map.iter()
        .filter_map(|(k, v)| {
            let accs: Vec<f64> = v.iter().map(|p| p.answer.accuracy()).collect();
            mean_std(&accs).map(|s| (k.clone(), s.mean))
        })
        .collect()
}

/// EasyEdit locality of one record: per key, the mean over probes of the share of answer
/// positions whose prediction is unchanged between `pre` and `post`.
///
/// # Errors
/// [`Error::InvalidInput`] when the two evaluations are of different requests.
pub fn record_locality(pre: &RecordEval, post: &RecordEval) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for (key, pre_probes) in &pre.locality {
        let post_probes =
            post.locality.get(key).filter(|p| p.len() == pre_probes.len()).ok_or_else(|| {
                Error::invalid("record_locality", key.clone(), "pre and post evaluations differ")
            })?;
        let mut vals = Vec::with_capacity(pre_probes.len());
        for (a, b) in pre_probes.iter().zip(post_probes) {
            vals.push(locality_unchanged(&a.answer.predictions, &b.answer.predictions)?);
        }
        if let Some(s) = mean_std(&vals) {
            out.insert(key.clone(), s.mean);
        }
    }
    Ok(out)
}

/// Evaluates every request on `model` (which should be in eval mode): rewrite, paraphrase and
/// neighbourhood prompts against both targets, locality and portability probes against their
/// answers, and optionally fluency generations.
///
/// # Errors
/// [`Error::InvalidEdit`] (via validation), [`Error::Model`], [`Error::Tch`].
pub fn evaluate_requests<M: CausalLm + ?Sized>(
    model: &M,
    requests: &[EditRequest],
    cfg: &EvalConfig,
) -> Result<Vec<RecordEval>> {
    crate::request::validate_requests(model, requests)?;
    // Collect every (prompt, answer) item, score them in batches, then distribute.
    let mut items: Vec<(String, String)> = Vec::new();
    let mut push = |p: String, a: &str| {
        items.push((p, a.to_string()));
        items.len() - 1
    };
    struct Slots {
        rewrite: (usize, Option<usize>),
        para: Vec<(usize, Option<usize>)>,
        nb: Vec<(usize, Option<usize>)>,
        loc: BTreeMap<String, Vec<usize>>,
        port: BTreeMap<String, Vec<usize>>,
    }
    let mut slots = Vec::with_capacity(requests.len());
    for r in requests {
        let mut both = |p: String| {
            let n = push(p.clone(), &r.target_new);
            let t = r.target_true.as_deref().map(|t| push(p, t));
            (n, t)
        };
        let rewrite = both(r.rewrite_prompt());
        let para = r.rephrase.iter().map(|p| both(r.substitute(p))).collect();
        let nb = r.neighbourhood.iter().map(|p| both(p.clone())).collect();
        let mut probes = |m: &BTreeMap<String, Vec<crate::request::QaPair>>| {
            m.iter()
                .map(|(k, v)| {
                    (k.clone(), v.iter().map(|q| push(q.prompt.clone(), &q.answer)).collect())
                })
                .collect::<BTreeMap<_, _>>()
        };
        let loc = probes(&r.locality);
        let port = probes(&r.portability);
        slots.push(Slots { rewrite, para, nb, loc, port });
    }
    let refs: Vec<(&str, &str)> = items.iter().map(|(p, a)| (p.as_str(), a.as_str())).collect();
    let scores = score_answers(model, &refs, cfg.batch_size)?;
    let prompt_eval = |(n, t): (usize, Option<usize>)| PromptEval {
        prompt: items[n].0.clone(),
        new: scores[n].clone(),
        true_: t.map(|t| scores[t].clone()),
    };
    let probe = |i: &usize| ProbeEval { prompt: items[*i].0.clone(), answer: scores[*i].clone() };
    let mut out = Vec::with_capacity(requests.len());
    for (r, s) in requests.iter().zip(slots) {
        let (generations, fluency) = match &cfg.fluency {
            None => (vec![], None),
            Some(f) => {
                let prompts: Vec<String> = if r.generation_prompts.is_empty() {
                    vec![r.rewrite_prompt()]
                } else {
                    r.generation_prompts.iter().map(|p| r.substitute(p)).collect()
                };
                let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let mut g = GenerationConfig::sampling(f.max_new_tokens, 1.0, f.seed);
                g.top_k = Some(f.top_k);
                g.stop_token_ids = vec![];
                let gens = generate(model, &refs, &g)?;
                let texts: Vec<String> =
                    gens.into_iter().map(|x| x.text.unwrap_or_default()).collect();
                let ge: Vec<f64> =
                    texts.iter().map(|t| generation_entropy(t, f.tokenizer, f.weights)).collect();
                let m = mean_std(&ge).map(|s| s.mean);
                (texts, m)
            }
        };
        out.push(RecordEval {
            rewrite: prompt_eval(s.rewrite),
            paraphrase: s.para.into_iter().map(prompt_eval).collect(),
            neighbourhood: s.nb.into_iter().map(prompt_eval).collect(),
            locality: s
                .loc
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(probe).collect()))
                .collect(),
            portability: s
                .port
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(probe).collect()))
                .collect(),
            generations,
            fluency,
        });
    }
    Ok(out)
}

/// The `memit-prob` summary (CounterFact; percentages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbSummary {
    /// Always `memit-prob`.
    pub protocol: Protocol,
    /// ES ×100 (mean ± sd over records).
    pub efficacy: Option<Stat>,
    /// PS ×100.
    pub paraphrase: Option<Stat>,
    /// NS ×100.
    pub neighbourhood: Option<Stat>,
    /// EM ×100.
    pub efficacy_magnitude: Option<Stat>,
    /// PM ×100.
    pub paraphrase_magnitude: Option<Stat>,
    /// NM ×100.
    pub neighbourhood_magnitude: Option<Stat>,
    /// S = hmean(ES, PS, NS) (when all three exist).
    pub score: Option<f64>,
}

/// The `memit-tokacc` summary (MEMIT zsRE style; percentages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZsreSummary {
    /// Always `memit-tokacc`.
    pub protocol: Protocol,
    /// Token accuracy of `target_new` on the rewrite prompts ×100.
    pub efficacy: Option<Stat>,
    /// The same on paraphrases ×100.
    pub paraphrase: Option<Stat>,
    /// Absolute token accuracy of the locality probes against their answers ×100.
    pub specificity: Option<Stat>,
    /// hmean of the three.
    pub score: Option<f64>,
}

/// The `easyedit-tokacc` numbers of one phase (percentages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EasyEditPhase {
    /// Always `easyedit-tokacc`.
    pub protocol: Protocol,
    /// `rewrite_acc` ×100.
    pub rewrite_acc: Option<f64>,
    /// `rephrase_acc` ×100.
    pub rephrase_acc: Option<f64>,
    /// `locality` ×100 per key: unchanged predictions (post phase only).
    pub locality: BTreeMap<String, f64>,
    /// `portability` ×100 per key: correctness.
    pub portability: BTreeMap<String, f64>,
    /// amend-specific (not reported by EasyEdit): hmean(rewrite_acc, rephrase_acc, mean
    /// locality), post phase only.
    pub edit_score_amend: Option<f64>,
}

/// Fluency (generation entropy ×100, mean ± sd over records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluencySummary {
    /// The family whose generation protocol is used (`memit-prob`: GE on sampled generations).
    pub protocol: Protocol,
    /// GE ×100.
    pub ge: Stat,
}

/// A metric before and after the edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrePost<T> {
    /// Before.
    pub pre: T,
    /// After.
    pub post: T,
}

/// Every editing metric, grouped by protocol family (MET-1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditMetrics {
    /// Records evaluated.
    pub records: usize,
    /// CounterFact probability comparison.
    pub memit_prob: PrePost<ProbSummary>,
    /// MEMIT zsRE token accuracy.
    pub memit_tokacc: PrePost<ZsreSummary>,
    /// EasyEdit token accuracy.
    pub easyedit_tokacc: PrePost<EasyEditPhase>,
    /// Fluency, when generations were made.
    pub fluency: Option<PrePost<FluencySummary>>,
}

fn stat100(xs: Vec<f64>) -> Option<Stat> {
    mean_std(&xs).map(|s| s.scaled(100.0))
}

fn score_of(parts: &[Option<Stat>]) -> Result<Option<f64>> {
    if parts.iter().all(Option::is_some) {
        let v: Vec<f64> = parts.iter().flatten().map(|s| s.mean).collect();
        Ok(Some(hmean(&v)?))
    } else {
        Ok(None)
    }
}

fn prob_summary(evals: &[RecordEval]) -> Result<ProbSummary> {
    let recs: Vec<ProbRecord> = evals.iter().map(RecordEval::prob).collect();
    let col = |f: fn(&ProbRecord) -> Option<f64>| stat100(recs.iter().filter_map(f).collect());
    let (es, ps, ns) = (col(|r| r.es), col(|r| r.ps), col(|r| r.ns));
    Ok(ProbSummary {
        protocol: Protocol::MemitProb,
        score: score_of(&[es, ps, ns])?,
        efficacy: es,
        paraphrase: ps,
        neighbourhood: ns,
        efficacy_magnitude: col(|r| r.em),
        paraphrase_magnitude: col(|r| r.pm),
        neighbourhood_magnitude: col(|r| r.nm),
    })
}

fn zsre_summary(evals: &[RecordEval]) -> Result<ZsreSummary> {
    let eff = stat100(evals.iter().map(RecordEval::rewrite_acc).collect());
    let para = stat100(evals.iter().filter_map(RecordEval::rephrase_acc).collect());
    let spec = stat100(evals.iter().filter_map(RecordEval::locality_correct).collect());
    Ok(ZsreSummary {
        protocol: Protocol::MemitTokAcc,
        score: score_of(&[eff, para, spec])?,
        efficacy: eff,
        paraphrase: para,
        specificity: spec,
    })
}

fn easyedit_phase(evals: &[RecordEval], pre: Option<&[RecordEval]>) -> Result<EasyEditPhase> {
    let mean100 = |xs: Vec<f64>| mean_std(&xs).map(|s| s.mean * 100.0);
    let rewrite = mean100(evals.iter().map(RecordEval::rewrite_acc).collect());
    let rephrase = mean100(evals.iter().filter_map(RecordEval::rephrase_acc).collect());
    // Portability and locality: average within the record first, then over records.
    let mut port: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for e in evals {
        for (k, v) in e.portability_acc() {
            port.entry(k).or_default().push(v);
        }
    }
    let portability = port.into_iter().filter_map(|(k, v)| mean100(v).map(|m| (k, m))).collect();
    let mut locality = BTreeMap::new();
    if let Some(pre) = pre {
        let mut loc: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (a, b) in pre.iter().zip(evals) {
            for (k, v) in record_locality(a, b)? {
                loc.entry(k).or_default().push(v);
            }
        }
        locality = loc.into_iter().filter_map(|(k, v)| mean100(v).map(|m| (k, m))).collect();
    }
    let loc_mean =
        (!locality.is_empty()).then(|| locality.values().sum::<f64>() / locality.len() as f64);
    let edit_score_amend = match (pre, rewrite, rephrase, loc_mean) {
        (Some(_), Some(a), Some(b), Some(c)) => Some(hmean(&[a, b, c])?),
        _ => None,
    };
    Ok(EasyEditPhase {
        protocol: Protocol::EasyEditTokAcc,
        rewrite_acc: rewrite,
        rephrase_acc: rephrase,
        locality,
        portability,
        edit_score_amend,
    })
}

fn fluency_summary(evals: &[RecordEval]) -> Option<FluencySummary> {
    let v: Vec<f64> = evals.iter().filter_map(|e| e.fluency).collect();
    stat100(v).map(|ge| FluencySummary { protocol: Protocol::MemitProb, ge })
}

/// Summarises per-record evaluations before and after an edit in all three families.
///
/// # Errors
/// [`Error::InvalidInput`] when `pre` and `post` differ in length or structure;
/// [`Error::MetricDomain`].
pub fn summarize(pre: &[RecordEval], post: &[RecordEval]) -> Result<EditMetrics> {
    if pre.len() != post.len() {
        return Err(Error::invalid(
            "summarize",
            "post",
            format!("{} pre-edit and {} post-edit records", pre.len(), post.len()),
        ));
    }
    let fluency = match (fluency_summary(pre), fluency_summary(post)) {
        (Some(a), Some(b)) => Some(PrePost { pre: a, post: b }),
        _ => None,
    };
    Ok(EditMetrics {
        records: pre.len(),
        memit_prob: PrePost { pre: prob_summary(pre)?, post: prob_summary(post)? },
        memit_tokacc: PrePost { pre: zsre_summary(pre)?, post: zsre_summary(post)? },
        easyedit_tokacc: PrePost {
            pre: easyedit_phase(pre, None)?,
            post: easyedit_phase(post, Some(pre))?,
        },
        fluency,
    })
}

/// Token-weighted mean NLL of texts (every token after the first is scored; the BOS/EOS token is
/// put first so that the first word is scored too). Used to see how an edit changes the
/// likelihood of preferred and dis-preferred texts.
///
/// `max_tokens` keeps the first `N` tokens of each text (counting the BOS token), as an edit
/// that truncates its texts (ProFS `max_len`) sees them; without it a text longer than the
/// model's context is an error.
///
/// # Errors
/// [`Error::Model`] (no tokenizer, a text with no tokens, a text longer than the context,
/// forward errors).
pub fn mean_text_nll<M: CausalLm + ?Sized>(
    model: &M,
    texts: &[&str],
    batch_size: usize,
    max_tokens: Option<usize>,
) -> Result<f64> {
    let opts = amend_models::ScoreOptions {
        prepend_bos: true,
        batch_size: batch_size.max(1),
        max_tokens,
        ..Default::default()
    };
    let scores = amend_models::score_texts(model, texts, &opts)?;
    Ok(amend_models::corpus_perplexity(&scores).ln())
}
