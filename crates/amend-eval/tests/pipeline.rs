//! The comparison pipeline on a tiny base model trained in the test: annotation, evaluator
//! consistency, and one short training run of every method.

use std::sync::OnceLock;

use amend_eval::annotate::{SampleOrigin, SamplingConfig, TrainingData, sample_training_data};
use amend_eval::methods::{Budget, Method, profs_method, profs_pairs, train_method};
use amend_eval::metrics::{EvalConfig, Evaluator};
use amend_eval::synthetic::{SyntheticTask, SyntheticTaskConfig};
use amend_eval::{SuppressionTask, UnwantedWords};
use amend_models::recipe::{TinyModelRecipe, TinyRecipe, TinyTrainRecipe, TokenizerRecipe};
use amend_models::{CausalLm, Gpt2};

struct Fixture {
    /// The trained model, saved (models are not `Sync`; each test loads its own copy).
    dir: tempfile::TempDir,
    task: SuppressionTask,
    data: TrainingData,
}

impl Fixture {
    fn model(&self) -> Gpt2 {
        tch::set_num_threads(1);
        Gpt2::load(self.dir.path().join("m"), &Default::default()).unwrap()
    }
}

/// A one-layer model trained for 250 steps on 3000 documents: it learns the format and the
/// unwanted words, which is all these tests need.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        tch::set_num_threads(1);
        let synthetic = SyntheticTask::new(SyntheticTaskConfig {
            corpus_docs: 3000,
            eval_prompts: 16,
            control_prompts: 8,
            heldout_texts: 32,
            ..SyntheticTaskConfig::default()
        })
        .unwrap();
        let recipe = TinyRecipe {
            tokenizer: TokenizerRecipe { vocab_size: 400, min_frequency: 2 },
            model: TinyModelRecipe {
                n_layer: 1,
                n_head: 2,
                n_embd: 32,
                n_positions: 64,
                dropout: 0.0,
            },
            train: TinyTrainRecipe {
                steps: 250,
                batch_size: 32,
                lr: 1e-2,
                warmup_steps: 10,
                ..Default::default()
            },
            seed: 0,
        };
        let (model, _) = amend_models::recipe::train_tiny_model(
            &synthetic.corpus(),
            &recipe,
            &amend_models::recipe::RunOptions::default(),
        )
        .unwrap();
        let mut task = synthetic.suppression_task();
        task.train_prompts.truncate(60);
        let cfg = SamplingConfig {
            samples_per_prompt: 8,
            negative_samples_per_prompt: 2,
            max_new_tokens: 32,
            ..Default::default()
        };
        let data = sample_training_data(&model, &task, &cfg, 0, &|_| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(&dir.path().join("m"), &Default::default()).unwrap();
        Fixture { dir, task, data }
    })
}

#[test]
fn samples_are_annotated_token_by_token() {
    let f = fixture();
    let model = f.model();
    let det: &UnwantedWords = f.task.detector.as_ref().unwrap();
    let tok = model.tokenizer().unwrap();
    assert!(f.data.stats.policy_unwanted > 0, "{:?}", f.data.stats);
    assert!(f.data.stats.usable_groups > 0, "{:?}", f.data.stats);
    for s in &f.data.samples {
        assert_eq!(s.weights.len(), s.response_ids.len());
        assert_eq!(s.unwanted, det.is_unwanted(&s.text), "{}", s.text);
        let negative: Vec<u32> = s
            .response_ids
            .iter()
            .zip(&s.weights)
            .filter(|(_, w)| **w < 0)
            .map(|(id, _)| *id)
            .collect();
        if s.unwanted {
            // The negative tokens spell (at least) the unwanted words found in the text.
            let text = tok.decode(&negative, true).unwrap();
            assert!(
                det.spans(&s.text).iter().all(|r| text.contains(&s.text[r.clone()])),
                "{text:?} in {:?}",
                s.text
            );
        } else {
            assert!(negative.is_empty());
        }
        assert!(s.ref_logp.is_finite() && s.ref_logp < 0.0);
    }
    // Negative-prompt samples are stored with the plain prompt.
    let marker = tok.encode(amend_eval::synthetic::NEGATIVE_MARKER, false).unwrap();
    for s in f.data.samples.iter().filter(|s| s.origin == SampleOrigin::NegPrompt) {
        assert!(!s.prompt_ids.windows(marker.len()).any(|w| w == marker));
    }
    assert!(!f.data.unwanted_token_ids.is_empty());
}

#[test]
fn the_base_model_is_scored_against_itself_exactly() {
    let f = fixture();
    let cfg = EvalConfig {
        samples_per_prompt: 4,
        rejection_samples_per_prompt: 8,
        control_samples_per_prompt: 4,
        max_new_tokens: 32,
        ..EvalConfig::default()
    };
    let model = f.model();
    let ev = Evaluator::new(&model, &f.task, cfg, 3).unwrap();
    let m = ev.evaluate(&model).unwrap();
    let base = ev.base_facts().kl_ideal_base.unwrap();
    let kl = m.kl_ideal.unwrap();
    // KL(p*‖p°) = −mean log Ẑ: the log-ratio term is exactly 0 for p_new = p°.
    assert!((kl.value - base.value).abs() < 1e-9, "{kl:?} vs {base:?}");
    assert!(kl.value > 0.0);
    assert_eq!(m.kl_control.unwrap().value, 0.0);
    let rate = m.unwanted_rate.unwrap();
    assert_eq!(rate.n, 16 * 4);
    assert!((0.0..=1.0).contains(&rate.value));
    assert!(m.heldout_perplexity.unwrap() > 1.0);
    assert!(ev.skipped().iter().any(|s| s.metric == "unwanted_token_logprob"));
    // Deterministic: the same seeds give the same numbers.
    assert_eq!(ev.evaluate(&model).unwrap().unwanted_rate, m.unwanted_rate);
}

#[test]
fn every_method_trains_and_moves_the_model() {
    let f = fixture();
    let budget = Budget { steps: 2, prompts_per_step: 2, ..Budget::default() };
    let base = f.model();
    let before = base.params().snapshot().unwrap();
    for m in Method::ALL {
        let strength = m.default_sweep()[2];
        let (model, stats) = train_method(&base, &f.data, m, strength, &budget, 0, &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{m}: {e}"));
        if m.is_tuning_free() {
            assert!(stats.losses.is_empty() && stats.final_metrics["profs/pairs"] > 0.0, "{m}");
        } else {
            assert_eq!(stats.losses.len(), 2, "{m}");
        }
        assert!(stats.losses.iter().all(|l| l.is_finite()), "{m}: {:?}", stats.losses);
        assert!(
            stats.grad_norms.iter().all(|g| g.is_finite() && *g > 0.0),
            "{m}: {:?}",
            stats.grad_norms
        );
        let moved: f64 = model
            .params()
            .iter()
            .zip(&before)
            .map(|(p, (_, b))| (p.tensor() - b).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(moved > 0.0, "{m} did not change the model");
        // The base model itself is untouched.
        let base_now = base.params().snapshot().unwrap();
        assert!(base_now.iter().zip(&before).all(|((_, a), (_, b))| a.equal(b)), "{m}");
    }
}

/// ProFS edits only the MLP value weights of its layers, from pairs of the same prompt, and
/// rejects a rank it cannot estimate.
#[test]
fn profs_projects_only_the_value_weights() {
    let f = fixture();
    let base = f.model();
    let pairs = profs_pairs(&f.data);
    let unwanted: usize =
        f.data.usable_groups().iter().map(|&g| f.data.groups[g].unwanted.len()).sum();
    assert_eq!(pairs.len(), unwanted);
    let det = f.task.detector.as_ref().unwrap();
    for p in &pairs {
        assert!(!det.is_unwanted(&p.preferred) && det.is_unwanted(&p.dispreferred), "{p:?}");
    }
    let before = base.params().snapshot().unwrap();
    let (model, stats) = profs_method(&base, &f.data, 2, None, 0).unwrap();
    assert_eq!(stats.final_metrics["profs/layer_start"], 0.0);
    assert_eq!(stats.final_metrics["profs/layer_end"], 1.0);
    for (p, (name, b)) in model.params().iter().zip(&before) {
        let changed = !p.tensor().equal(b);
        assert_eq!(changed, name == "transformer.h.0.mlp.c_proj.weight", "{name}");
    }
    let too_big = profs_method(&base, &f.data, pairs.len() + 1, None, 0);
    assert!(matches!(too_big, Err(amend_eval::Error::Edit(_))), "{:?}", too_big.err());
    let not_integer =
        train_method(&base, &f.data, Method::Profs, 1.5, &Budget::default(), 0, &mut |_, _| {});
    assert!(matches!(not_integer, Err(amend_eval::Error::InvalidInput { .. })));
}

/// A checkpoint of a longer run is exactly the model of a shorter run: the steps grid of the
/// comparison evaluates one run at several step counts.
#[test]
#[allow(clippy::result_large_err)] // the callback returns amend_eval::Result
fn checkpoints_equal_shorter_runs() {
    use amend_eval::methods::train_method_checkpoints;
    let f = fixture();
    let base = f.model();
    for m in [Method::Tnrr, Method::Dpo] {
        let short = Budget { steps: 2, prompts_per_step: 2, ..Budget::default() };
        let (two, stats2) =
            train_method(&base, &f.data, m, 10.0, &short, 3, &mut |_, _| {}).unwrap();
        let long = Budget { steps: 3, ..short.clone() };
        let mut seen = Vec::new();
        let three = train_method_checkpoints(
            &base,
            &f.data,
            m,
            10.0,
            &long,
            &[2, 3, 0, 9],
            3,
            &mut |_, _| {},
            &mut |steps, model, stats| {
                if steps == 2 {
                    let a = model.params().snapshot().unwrap();
                    let b = two.params().snapshot().unwrap();
                    assert!(a.iter().zip(&b).all(|((_, x), (_, y))| x.equal(y)), "{m}");
                    assert_eq!(stats.losses, stats2.losses, "{m}");
                }
                seen.push((steps, stats.losses.len()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [(2, 2), (3, 3)], "{m}: out-of-range checkpoints are ignored");
        let a = three.params().snapshot().unwrap();
        let b = two.params().snapshot().unwrap();
        assert!(!a.iter().zip(&b).all(|((_, x), (_, y))| x.equal(y)), "{m}: step 3 moved");
    }
}

/// The base model's view of the first tokens of unwanted spans (mean probability, top-1
/// fraction), computed in padded batches, equals the same computed one unpadded sequence at a
/// time, with the probabilities taken from `score_ids`.
#[test]
fn the_unwanted_start_view_matches_per_sequence_scoring() {
    use tch::IndexOp;
    let f = fixture();
    let model = f.model();
    let (mass, top1) = amend_eval::annotate::unwanted_start_view(&model, &f.data).unwrap();
    let (mut m, mut t, mut n) = (0.0f64, 0usize, 0usize);
    for g in f.data.usable_groups() {
        for &i in &f.data.groups[g].unwanted {
            let s = &f.data.samples[i];
            let full = s.full_ids();
            let score = amend_models::score_ids(
                &model,
                std::slice::from_ref(&full),
                &[s.prompt_ids.len()],
                1,
            )
            .unwrap()
            .remove(0);
            let ids =
                tch::Tensor::from_slice(&full.iter().map(|&x| i64::from(x)).collect::<Vec<_>>())
                    .unsqueeze(0);
            let logits = model.forward(&ids, None).unwrap();
            for (k, &w) in s.weights.iter().enumerate() {
                if w < 0 && (k == 0 || s.weights[k - 1] > 0) {
                    m += f64::from(score.logprobs[k]).exp();
                    let pos = (s.prompt_ids.len() + k - 1) as i64;
                    let argmax = logits.i((0, pos)).argmax(0, false).int64_value(&[]);
                    t += usize::from(argmax == i64::from(s.response_ids[k]));
                    n += 1;
                }
            }
        }
    }
    assert!(n > 0);
    assert!((mass - m / n as f64).abs() < 1e-5, "{mass} vs {}", m / n as f64);
    assert!((top1 - t as f64 / n as f64).abs() < 1e-12, "{top1} vs {t}/{n}");
    assert!((f.data.stats.unwanted_start_mass - mass).abs() < 1e-5);
}

/// The minimal pairs of the `pairs` regime: each unwanted response and its counterpart without
/// the unwanted words, same prompt, in the same order, clean by the detector.
#[test]
fn minimal_pairs_pair_each_unwanted_response_with_itself() {
    let f = fixture();
    let base = f.model();
    let det = f.task.detector.as_ref().unwrap();
    let pairs = amend_eval::pairs::minimal_pair_data(&base, &f.data, det, 0).unwrap();
    assert_eq!(pairs.usable_groups(), f.data.usable_groups());
    let mut checked = 0;
    for g in pairs.usable_groups() {
        let gr = &pairs.groups[g];
        assert_eq!(gr.unwanted, f.data.groups[g].unwanted, "the unwanted side is unchanged");
        assert_eq!(gr.clean.len(), gr.unwanted.len());
        for (&c, &u) in gr.clean.iter().zip(&gr.unwanted) {
            let (c, u) = (&pairs.samples[c], &pairs.samples[u]);
            assert!(!det.is_unwanted(&c.text) && det.is_unwanted(&u.text), "{c:?}");
            assert_eq!(c.prompt_ids, u.prompt_ids);
            // Only the unwanted words differ: the words of the counterpart are those of the
            // unwanted response, minus or with one substitute per unwanted word.
            let (cw, uw): (Vec<&str>, Vec<&str>) =
                (c.text.split_whitespace().collect(), u.text.split_whitespace().collect());
            assert!(cw.len() <= uw.len() && uw.len() - cw.len() <= 2, "{} / {}", c.text, u.text);
            assert!(c.ref_logp.is_finite() && c.ref_logp < 0.0);
            assert!(c.weights.iter().all(|&w| w == 1));
            checked += 1;
        }
    }
    assert!(checked > 0);
}

/// The whole comparison in process, every method at two sweep points × two checkpoints × two
/// seeds, on the fixture model with a small configuration (the CLI's `--quick` runs the same
/// code on a bigger model; its test, `tests/compare_cli.rs` at the repository root, is
/// `#[ignore]`d because it takes minutes in debug). Checks that the report is complete and well
/// formed, not that any method wins; that the numbers do not depend on the number of workers;
/// and that a second run with the same point cache reads every run back.
#[test]
fn a_small_comparison_writes_a_complete_report() {
    use amend_eval::compare::{
        BaseModelInfo, BudgetGrid, CompareConfig, NoProgress, PointCache, Regime, run_comparison,
    };
    let f = fixture();
    let model = f.model();
    let mut cfg = CompareConfig::quick();
    cfg.mode = "test".into();
    cfg.seed = 5;
    cfg.sampling = SamplingConfig {
        samples_per_prompt: 8,
        negative_samples_per_prompt: 2,
        max_new_tokens: 24,
        ..Default::default()
    };
    cfg.eval = EvalConfig {
        samples_per_prompt: 2,
        rejection_samples_per_prompt: 4,
        control_samples_per_prompt: 2,
        max_new_tokens: 24,
        ..EvalConfig::default()
    };
    cfg.budget = Budget { prompts_per_step: 2, ..Budget::default() };
    cfg.grid = BudgetGrid { learning_rates: vec![1e-4], steps: vec![2, 1] };
    cfg.seeds = 2;
    cfg.workers = 2;
    let info = BaseModelInfo {
        dir: f.dir.path().display().to_string(),
        recipe: None,
        report: None,
        trained_now: false,
        parameters: model.params().num_elements(false),
        seconds: 0.0,
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = PointCache::new(cache_dir.path());
    let r = run_comparison(&model, info.clone(), &f.task, &cfg, Some(&cache), &NoProgress).unwrap();
    assert_eq!(r.config.seed, 5);
    // Per seed: 13 trained methods × 2 strengths × 2 checkpoints, ProFS × 2.
    let per_seed = (Method::ALL.len() - 1) * 2 * 2 + 2;
    assert_eq!(r.points.len(), 2 * per_seed);
    assert_eq!(r.aggregates.len(), per_seed);
    assert!(r.aggregates.iter().all(|a| a.points.len() == 2 && a.failed == 0));
    assert_eq!(r.summary.len(), Method::ALL.len());
    assert_eq!(r.seed_runs.iter().map(|s| s.seed).collect::<Vec<_>>(), [5, 6]);
    assert_eq!((r.timing.runs, r.timing.cached_runs, r.timing.workers), (2 * (13 * 2 + 2), 0, 2));
    for m in &r.summary {
        assert!(!m.frontier.is_empty(), "{}", m.method);
        assert_eq!(m.kl_at_matched.len(), 2);
        assert_eq!(m.area.per_seed.len(), 2);
        if let Some(a) = m.area.mean {
            assert!((0.0..=1.0 + 1e-9).contains(&a.value), "{}: {a:?}", m.method);
        }
        // The frontier is sorted by rate with decreasing KL.
        let fr: Vec<(f64, f64)> = m
            .frontier
            .iter()
            .map(|&i| {
                (
                    r.aggregates[i].unwanted_rate.unwrap().value,
                    r.aggregates[i].kl_ideal.unwrap().value,
                )
            })
            .collect();
        assert!(fr.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 > w[1].1), "{fr:?}");
    }
    assert_eq!(r.summary.iter().filter(|m| m.area.best).count(), 1);
    // The checkpoints: 1 and 2 steps, sorted.
    let tnrr: Vec<usize> =
        r.points.iter().filter(|p| p.method == Method::Tnrr).map(|p| p.steps).collect();
    assert_eq!(&tnrr[..4], [1, 2, 1, 2]);

    // Resumption: every run comes back from the cache, with the same numbers.
    let again =
        run_comparison(&model, info.clone(), &f.task, &cfg, Some(&cache), &NoProgress).unwrap();
    assert_eq!(again.timing.cached_runs, again.timing.runs);
    assert_eq!(again.points, r.points);
    assert_eq!(again.summary, r.summary);

    // One worker, no cache: the same metrics (each run is seeded on its own).
    let mut one = cfg.clone();
    one.workers = 1;
    one.sweeps.retain(|s| matches!(s.method, Method::Tnrr | Method::Dpo | Method::Profs));
    let single = run_comparison(&model, info.clone(), &f.task, &one, None, &NoProgress).unwrap();
    for p in &single.points {
        let q = r
            .points
            .iter()
            .find(|q| {
                (q.method, q.strength.to_bits(), q.steps, q.seed)
                    == (p.method, p.strength.to_bits(), p.steps, p.seed)
            })
            .unwrap();
        assert_eq!(p.metrics.unwanted_rate, q.metrics.unwanted_rate, "{}", p.label());
        assert_eq!(p.metrics.kl_ideal, q.metrics.kl_ideal, "{}", p.label());
        assert_eq!(p.train.losses, q.train.losses, "{}", p.label());
        if cfg!(target_os = "linux") {
            assert!(p.memory.peak_rss_bytes.is_some(), "measured with one worker");
        }
    }

    // The pairs regime: the sequence-level methods train on minimal pairs.
    let mut pairs = one.clone();
    pairs.regime = Regime::Pairs;
    pairs.seeds = 1;
    let rp = run_comparison(&model, info.clone(), &f.task, &pairs, None, &NoProgress).unwrap();
    let pd = rp.seed_runs[0].pair_data.as_ref().expect("pairs data");
    assert!(pd.policy_samples > rp.data.policy_samples, "the counterparts are added");
    let tn = |r: &amend_eval::compare::CompareResults,
              m: Method|
     -> Vec<Option<amend_eval::metrics::Estimate>> {
        r.points
            .iter()
            .filter(|p| p.method == m && p.seed == 5)
            .map(|p| p.metrics.kl_ideal)
            .collect()
    };
    assert_eq!(tn(&rp, Method::Tnrr), tn(&single, Method::Tnrr), "token-level: same data");
    assert_ne!(tn(&rp, Method::Dpo), tn(&single, Method::Dpo), "DPO: other pairs");
    assert!(r.skipped.iter().all(|s| s.metric == "unwanted_token_logprob"), "{:?}", r.skipped);
    let base_rate = r.seed_runs[0].base_metrics.unwanted_rate.unwrap();
    for p in &r.points {
        assert!(p.error.is_none(), "{}: {:?}", p.label(), p.error);
        let m = &p.metrics;
        assert_eq!(m.unwanted_rate.unwrap().n, base_rate.n, "{}", p.label());
        assert!(m.kl_ideal.unwrap().value.is_finite(), "{}", p.label());
        assert!(m.kl_control.unwrap().value.is_finite(), "{}", p.label());
        assert!(m.heldout_perplexity.unwrap() > 1.0, "{}", p.label());
        assert_eq!(p.train.losses.len(), p.steps, "{}", p.label());
    }
    // ProFS records the logit-lens view of every direction of every edited layer.
    for p in r.points.iter().filter(|p| p.method == Method::Profs) {
        let k = p.strength as usize;
        let layers = amend_eval::methods::profs_layers(model.config().num_layers()).len();
        // k directions per layer (fewer where the difference matrix has a lower rank).
        let n = p.train.lens.len();
        assert!(n >= layers && n <= k * layers, "{}: {n}", p.label());
        assert!(p.train.lens.iter().all(|d| d.top.len() == 10 && d.bottom.len() == 10));
        assert!(p.train.lens.iter().all(|d| (0.0..=1.0).contains(&d.energy)));
    }
    assert!(r.matched_rates.len() == 2 && r.matched_rates[0] > 0.0);
    let t = &r.timing;
    assert!(t.total_seconds >= t.points_seconds && t.points_seconds > 0.0);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let files = amend_eval::report::write_report(&r, &out).unwrap();
    let back: amend_eval::compare::CompareResults =
        serde_json::from_str(&std::fs::read_to_string(&files.json).unwrap()).unwrap();
    assert_eq!(back.points.len(), r.points.len());
    assert_eq!(back.config, r.config);
    let md = std::fs::read_to_string(&files.markdown).unwrap();
    for needle in [
        "## Which method is best",
        "## Frontiers",
        "## Every setting",
        "![unwanted rate",
        "| base p° |",
        "★",
        "## ProFS: what the projected subspace is",
        "and ranks it first at",
    ] {
        assert!(md.contains(needle), "{needle}");
    }
    for m in &r.summary {
        // One summary row, its frontier rows and one row per setting.
        let rows =
            md.lines().filter(|l| l.starts_with(&format!("| {} |", m.method.name()))).count();
        let settings = r.aggregates.iter().filter(|a| a.method == m.method).count();
        assert_eq!(rows, 1 + m.frontier.len() + settings, "{}", m.method);
    }
    let svg = std::fs::read_to_string(files.svg.unwrap()).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("ideal p*") && svg.contains("ProFS") && svg.contains("TNRR"));
    let png = std::fs::read(files.png.unwrap()).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let summary = amend_eval::report::terminal_summary(&r);
    assert!(summary.contains("scores of each method over 2 seeds"), "{summary}");
}
