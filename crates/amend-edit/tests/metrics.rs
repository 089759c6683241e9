//! Editing metrics: spec C.7 test vectors, model-based scores against amend-models' scoring,
//! and the fact task.

use std::path::PathBuf;

use amend_edit::Error;
use amend_edit::metrics::{
    EvalConfig, FluencyConfig, WordTokenizer, counterfact_record, evaluate_requests,
    generation_entropy, hmean, locality_unchanged, ngram_entropy, score_answers, summarize,
    token_accuracy,
};
use amend_edit::tasks::facts::{FactTask, FactTaskConfig, RELATIONS};
use amend_edit::{EditRequest, QaPair};
use amend_models::{LoadOptions, ScoreOptions, load, score_continuations};
use amend_testing::{F64, Tol};

const SIX: Tol = Tol { rel: 0.0, abs: 1e-6 };

fn gpt2_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../amend-models/tests/fixtures/models/gpt2")
}

#[test]
fn counterfact_record_c7() {
    let r = counterfact_record(
        &[(0.5, 2.0)],
        &[(1.2, 0.9), (0.7, 1.5)],
        &[(0.3, 1.1), (0.8, 0.6), (0.2, 2.0), (0.4, 0.9)],
    );
    assert_eq!((r.es, r.ps, r.ns), (Some(1.0), Some(0.5), Some(0.75)));
    let s = hmean(&[1.0, 0.5, 0.75]).unwrap();
    SIX.assert_all_close("S", &[s], &[0.692308]);
    SIX.assert_all_close(
        "EM PM NM",
        &[r.em.unwrap(), r.pm.unwrap(), r.nm.unwrap()],
        &[0.471195, 0.084040, 0.313903],
    );
    // Ties fail.
    assert_eq!(counterfact_record(&[(1.0, 1.0)], &[], &[]).es, Some(0.0));
    assert_eq!(counterfact_record(&[], &[], &[]).ps, None);
}

#[test]
fn hmean_c7() {
    let t = Tol { rel: 0.0, abs: 1e-4 };
    t.assert_all_close("MEMIT CF", &[hmean(&[98.9, 88.6, 73.7]).unwrap()], &[85.7966]);
    t.assert_all_close("FT-W CF", &[hmean(&[99.4, 77.0, 46.9]).unwrap()], &[67.6143]);
    t.assert_all_close("MEMIT zsRE", &[hmean(&[96.7, 89.7, 26.6]).unwrap()], &[50.7756]);
    t.assert_all_close("FT-W zsRE", &[hmean(&[69.6, 64.8, 24.1]).unwrap()], &[42.0795]);
    assert_eq!(hmean(&[1.0, 0.5, 0.0]).unwrap(), 0.0);
    assert!(matches!(hmean(&[1.0, -0.5]), Err(Error::MetricDomain { .. })));
    assert!(matches!(hmean(&[f64::NAN]), Err(Error::MetricDomain { .. })));
    assert!(matches!(hmean(&[]), Err(Error::MetricDomain { .. })));
}

#[test]
fn easyedit_locality_and_token_accuracy_c7() {
    SIX.assert_all_close(
        "locality",
        &[locality_unchanged(&[29, 234, 334], &[29, 234, 333]).unwrap()],
        &[0.666667],
    );
    // Unchanged is not correct: two wrong predictions that agree are "local".
    assert_eq!(locality_unchanged(&[7, 7], &[7, 7]).unwrap(), 1.0);
    assert_eq!(token_accuracy(&[7, 7], &[1, 2]).unwrap(), 0.0);
    assert!(locality_unchanged(&[1], &[1, 2]).is_err());
    assert!(token_accuracy(&[], &[]).is_err());
}

#[test]
fn fluency_c7() {
    let w: Vec<&str> = "the cat sat on the mat the cat sat".split(' ').collect();
    SIX.assert_all_close("H2", &[ngram_entropy(&w, 2)], &[2.5]);
    SIX.assert_all_close("H3", &[ngram_entropy(&w, 3)], &[2.521641]);
    let ge = generation_entropy(
        "the cat sat on the mat the cat sat",
        WordTokenizer::Whitespace,
        (2.0 / 3.0, 4.0 / 3.0),
    );
    SIX.assert_all_close("GE", &[ge], &[2.514427]);
    assert_eq!(
        generation_entropy("la la la la la la", WordTokenizer::Whitespace, (2.0 / 3.0, 4.0 / 3.0)),
        0.0
    );
    assert_eq!(generation_entropy("", WordTokenizer::Punctuation, (2.0 / 3.0, 4.0 / 3.0)), 0.0);
    assert_eq!(WordTokenizer::Punctuation.words("Hello, world!"), ["Hello", ",", "world", "!"]);
}

#[test]
fn answer_scores_agree_with_amend_models_scoring() {
    tch::set_num_threads(1);
    let model = load(gpt2_dir(), &LoadOptions::default()).unwrap();
    let items = [("The capital of France is", "Paris"), ("a b c", "d e"), ("x", "yz")];
    let ours = score_answers(&model, &items, 2).unwrap();
    let spaced: Vec<(String, String)> =
        items.iter().map(|(p, a)| (p.to_string(), format!(" {a}"))).collect();
    let refs: Vec<(&str, &str)> = spaced.iter().map(|(p, a)| (p.as_str(), a.as_str())).collect();
    let theirs = score_continuations(&model, &refs, &ScoreOptions::default()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close("mean nll", &[a.mean_nll], &[b.mean_nll()]);
        assert_eq!(a.labels, b.scored_ids());
        assert_eq!(a.predictions.len(), a.labels.len());
    }
    let e = score_answers(&model, &[("", "x")], 2).unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
}

#[test]
fn evaluation_before_equals_after_for_an_unchanged_model() {
    tch::set_num_threads(1);
    let model = load(gpt2_dir(), &LoadOptions::default()).unwrap();
    let reqs = vec![
        EditRequest::new("The capital of France is", "Rome")
            .with_target_true("Paris")
            .with_rephrase(["France's capital:"])
            .with_neighbourhood(["The capital of Gaul is", "Le capital est"]),
        EditRequest {
            locality: [("other".to_string(), vec![QaPair::new("one two", "three")])].into(),
            portability: [("hop".to_string(), vec![QaPair::new("Rome is in", "Italy")])].into(),
            ..EditRequest::new("a", "b").with_target_true("c")
        },
    ];
    let cfg = EvalConfig {
        batch_size: 3,
        fluency: Some(FluencyConfig { max_new_tokens: 8, ..FluencyConfig::default() }),
    };
    let pre = evaluate_requests(&model, &reqs, &cfg).unwrap();
    let post = evaluate_requests(&model, &reqs, &cfg).unwrap();
    let m = summarize(&pre, &post).unwrap();
    assert_eq!(m.records, 2);
    assert_eq!(m.memit_prob.pre, m.memit_prob.post);
    assert_eq!(m.easyedit_tokacc.post.locality["other"], 100.0, "nothing changed");
    assert!(m.easyedit_tokacc.post.portability.contains_key("hop"));
    assert_eq!(m.fluency.as_ref().unwrap().pre.ge.count, 2);
    assert_eq!(pre[0].neighbourhood.len(), 2);
    // NS / ES are the exact comparisons of the NLLs.
    let r = pre[0].prob();
    let es = f64::from(u8::from(
        pre[0].rewrite.new.mean_nll < pre[0].rewrite.true_.as_ref().unwrap().mean_nll,
    ));
    F64.assert_all_close("ES", &[r.es.unwrap()], &[es]);
    assert!(summarize(&pre, &post[..1]).is_err());
}

#[test]
fn fact_task_structure() {
    let cfg = FactTaskConfig::default();
    let a = FactTask::new(&cfg).unwrap();
    assert_eq!(a, FactTask::new(&cfg).unwrap(), "seeded");
    assert_ne!(a, FactTask::new(&FactTaskConfig { seed: 1, ..cfg.clone() }).unwrap());
    assert_eq!(a.subjects.len(), 80);
    assert_eq!(a.edits.len(), 20);
    let mut edited_subjects = std::collections::HashSet::new();
    for (e, &(s, r, o_new)) in a.edits.iter().zip(&a.edited) {
        assert!(edited_subjects.insert(s), "one edit per subject");
        assert_eq!(e.subject.as_deref(), Some(a.subjects[s].as_str()));
        assert_eq!(e.target_true.as_deref(), Some(a.object(s, r)));
        assert_eq!(e.target_new, RELATIONS[r].objects[o_new]);
        assert_ne!(e.target_new, a.object(s, r));
        // Paraphrases: every other template of the relation, never the rewrite template.
        assert_eq!(e.rephrase.len(), RELATIONS[r].templates.len() - 1);
        assert!(!e.rephrase.contains(&e.rewrite_prompt()));
        // Neighbours share the relation and the true object.
        for p in &e.neighbourhood {
            let x = a.subjects.iter().position(|n| p.contains(n.as_str())).unwrap();
            assert_ne!(x, s);
            assert_eq!(a.object(x, r), a.object(s, r));
        }
        assert_eq!(e.locality["same_subject"].len(), cfg.n_relations - 1);
        e.validate(0).unwrap();
    }
    // The locality pool holds no edited or probed fact (any template).
    let fact_of = |prompt: &str| -> (usize, usize) {
        for s in 0..a.subjects.len() {
            for (r, spec) in RELATIONS.iter().enumerate().take(cfg.n_relations) {
                if (0..spec.templates.len()).any(|t| a.prompt(s, r, t) == prompt) {
                    return (s, r);
                }
            }
        }
        panic!("not a task prompt: {prompt}")
    };
    let mut probed = std::collections::HashSet::new();
    for e in &a.edits {
        probed.insert(fact_of(&e.rewrite_prompt()));
        for p in &e.neighbourhood {
            probed.insert(fact_of(p));
        }
        for q in e.locality.values().flatten() {
            probed.insert(fact_of(&q.prompt));
        }
    }
    assert!(!a.locality_pool.is_empty());
    for q in &a.locality_pool {
        let (s, r) = fact_of(&q.prompt);
        assert!(!probed.contains(&(s, r)), "{}", q.prompt);
        assert_eq!(q.answer, a.object(s, r));
    }
    assert_eq!(a.locality_pool.len() + probed.len(), 80 * cfg.n_relations);
    // Corpus: every fact stated, every template used.
    let corpus = a.corpus();
    assert_eq!(corpus.len(), 80 * cfg.docs_per_subject);
    let s0 = format!("{} {}.", a.prompt(0, 1, 2), a.object(0, 1));
    assert!(corpus.iter().any(|d| d.contains(&s0)));
    // Preference pairs for ProFS: true fact vs the suppressed object.
    let sup = a.most_common_object(0);
    let pairs = a.preference_pairs(0, sup);
    assert!(pairs.len() >= 4 * 40);
    assert!(
        pairs.iter().all(|p| p.dispreferred.ends_with(&format!(" {}.", RELATIONS[0].objects[sup])))
    );
    assert!(FactTask::new(&FactTaskConfig { n_relations: 9, ..cfg.clone() }).is_err());
    assert!(FactTask::new(&FactTaskConfig { n_edits: 100, ..cfg }).is_err());
}

/// Trains the task's real model (about two minutes in release on 2 cores; the first run caches
/// it) and checks that it learned the facts and that FT-M edits it. Run with
/// `cargo test --release -p amend-edit --test metrics -- --ignored`.
#[test]
#[ignore = "trains the fact-task model; run in release (see docs/editing.md)"]
fn fact_task_model_learns_the_facts_and_can_be_edited() {
    use amend_edit::ft::{EditMode, FtOptions, FtRecipe, ParamSelector, ft_edit};
    use amend_edit::tasks::default_model_cache;
    use amend_models::recipe::RunOptions;
    let task = FactTask::new(&FactTaskConfig::default()).unwrap();
    let (model, _, _) =
        task.model(&FactTask::recipe(), &default_model_cache(), &RunOptions::default()).unwrap();
    let stats = task.answer_stats(&model, None, 64).unwrap();
    for (rel, acc) in &stats.accuracy {
        assert!(*acc > 0.9, "{rel}: {acc}");
    }
    let mut m = model.try_clone().unwrap();
    let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] })
        .with_lr(5e-3)
        .with_mode(EditMode::Batched);
    let out = ft_edit(
        &mut m,
        &task.edits,
        &recipe,
        &FtOptions { locality_pool: task.locality_pool.clone(), ..FtOptions::default() },
    )
    .unwrap();
    let p = out.metrics.unwrap().memit_prob;
    assert!(p.pre.efficacy.unwrap().mean < 10.0);
    assert!(p.post.efficacy.unwrap().mean > 90.0);
}

#[test]
fn sliding_window_perplexity_scores_every_token_once() {
    use amend_edit::metrics::{
        PerplexityConfig, PplAggregation, greedy_continuations, sliding_window_perplexity,
        write_continuations,
    };
    use amend_models::{CausalLm, score_ids, score_texts};
    tch::set_num_threads(1);
    let model = load(gpt2_dir(), &LoadOptions::default()).unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(6);
    let n = model.tokenizer().unwrap().encode(&text, true).unwrap().len();
    assert!(n > 64, "longer than the model's 64 positions: {n}");
    // One window covering everything (explicit override): both aggregations = exact perplexity.
    let full =
        PerplexityConfig { window: Some(n), stride: n, aggregation: PplAggregation::TokenMean };
    let r = sliding_window_perplexity(
        &model,
        &text[..80],
        &PerplexityConfig { window: Some(64), stride: 64, ..full.clone() },
    )
    .unwrap();
    let exact =
        score_texts(&model, &[&text[..80]], &ScoreOptions::default()).unwrap()[0].perplexity();
    Tol { rel: 1e-5, abs: 0.0 }.assert_all_close("one window", &[r.perplexity], &[exact]);
    assert_eq!(r.windows, 1);
    // Default: window = n_positions (64), stride 32 (overlapping): every token after the first
    // is scored exactly once; TokenMean equals scoring the same windows by hand.
    let cfg = PerplexityConfig { window: None, stride: 32, aggregation: PplAggregation::TokenMean };
    let r = sliding_window_perplexity(&model, &text, &cfg).unwrap();
    assert_eq!((r.window, r.window_overridden), (64, false));
    assert_eq!(r.tokens_scored, n - 1);
    let ids = model.tokenizer().unwrap().encode(&text, true).unwrap();
    let (mut seqs, mut firsts, mut prev, mut begin) = (vec![], vec![], 0usize, 0usize);
    loop {
        let end = (begin + 64).min(n);
        seqs.push(ids[begin..end].to_vec());
        firsts.push((end - begin) - (end - prev));
        prev = end;
        if end == n {
            break;
        }
        begin += 32;
    }
    let s = score_ids(&model, &seqs, &firsts, 4).unwrap();
    let (sum, cnt) = s.iter().fold((0.0, 0), |(a, b), x| (a + x.sum_logprob(), b + x.count()));
    Tol { rel: 1e-5, abs: 0.0 }.assert_all_close(
        "token mean",
        &[r.perplexity],
        &[(-sum / cnt as f64).exp()],
    );
    let wm = sliding_window_perplexity(
        &model,
        &text,
        &PerplexityConfig { aggregation: PplAggregation::WindowMean, ..cfg.clone() },
    )
    .unwrap();
    let mean_w = s.iter().map(|x| x.mean_nll()).sum::<f64>() / s.len() as f64;
    Tol { rel: 1e-5, abs: 0.0 }.assert_all_close("window mean", &[wm.perplexity], &[mean_w.exp()]);
    assert!(
        sliding_window_perplexity(&model, &text, &PerplexityConfig { stride: 100, ..cfg }).is_err()
    );
    // Greedy continuations as JSONL.
    let c = greedy_continuations(&model, "gpt2-fixture", &["the cat", "a dog"], 10).unwrap();
    assert_eq!(c.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("gen.jsonl");
    write_continuations(&p, &c).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["prompt"], "a dog");
    assert_eq!(lines[0]["model"], "gpt2-fixture");
}
