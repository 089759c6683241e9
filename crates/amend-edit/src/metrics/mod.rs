//! Editing metrics in both protocol families (spec Part C).
//!
//! | concept | `memit-prob` (CounterFact) | `memit-tokacc` (zsRE) | `easyedit-tokacc` |
//! |---|---|---|---|
//! | efficacy | ES: `NLL(new) < NLL(true)` on the rewrite prompt | token accuracy of `target_new` | `rewrite_acc` |
//! | generalisation | PS: the same on paraphrases | token accuracy on paraphrases | `rephrase_acc` |
//! | locality | NS: `NLL(true) < NLL(new)` on neighbourhood prompts | absolute accuracy of locality probes | `locality`: **unchanged** argmax predictions |
//! | portability | — | — | `portability`: accuracy on portability probes |
//! | fluency | GE: n-gram entropy of sampled generations | — | `fluency` |
//! | edit score | hmean(ES, PS, NS) | hmean(Eff, Para, Spec) | not reported by EasyEdit (amend-specific `edit_score_amend`) |
//!
//! Every number carries its [`Protocol`] tag and summaries never mix families (MET-1, MET-3).
//! Token accuracy and EasyEdit locality are separate functions ([`token_accuracy`],
//! [`locality_unchanged`]) so that "correct" and "unchanged" cannot be swapped (MET-2).
//! Summaries are percentages (×100); per-record values are fractions.
//!
//! The ProFS evaluation protocol (spec A.8) is served by [`sliding_window_perplexity`] (PF-13)
//! and [`greedy_continuations`] / [`write_continuations`] (PF-12: JSONL for Detoxify or any
//! other scorer).
//!
//! Sources: MEMIT `experiments/summarize.py` and `experiments/py/eval_utils_*.py`; EasyEdit
//! `easyeditor/evaluate/evaluate_utils.py`, `editors/editor.py`, `editors/utils.py`.

mod eval;
mod ppl;
mod scores;

pub use eval::{
    AnswerScore, EasyEditPhase, EditMetrics, EvalConfig, FluencyConfig, FluencySummary, PrePost,
    ProbSummary, ProbeEval, PromptEval, RecordEval, ZsreSummary, evaluate_requests, mean_text_nll,
    record_locality, score_answers, summarize,
};
pub use ppl::{
    Continuation, PerplexityConfig, PerplexityReport, PplAggregation, greedy_continuations,
    sliding_window_perplexity, write_continuations,
};
pub use scores::{
    ProbRecord, Protocol, Stat, WordTokenizer, counterfact_record, generation_entropy, hmean,
    locality_unchanged, ngram_entropy, token_accuracy,
};
