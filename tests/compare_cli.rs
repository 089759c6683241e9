//! `amend compare`: `--quick` end to end (the report is complete and well formed; no method is
//! expected to win), and real use with `--model DIR --data FILE.jsonl` on the tiny fixture
//! models of amend-models.
//!
//! The `--quick` test trains the quick base model and runs 212 points (108 runs, two seeds),
//! then the same command again, which reads every run back from the point cache: about 2.5
//! minutes in a release build on 2 cores and far longer in the debug profile of `make test`, so
//! it is
//! `#[ignore]`d there and run by `make test-compare` (release). The same pipeline (every method,
//! report files) is checked in the debug suite by `a_small_comparison_writes_a_complete_report`
//! in `crates/amend-eval/tests/pipeline.rs` on a smaller model and configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use amend::eval::compare::CompareResults;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("amend-compare-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn amend(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env("AMEND_CACHE_DIR", cache)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn results(dir: &Path) -> CompareResults {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("crates/amend-models/tests/fixtures/models")
        .join(name)
}

#[test]
#[ignore = "minutes in debug; run by `make test-compare` (release)"]
fn quick_compare_writes_a_complete_report() {
    let tmp = TempDir::new("quick");
    let out = tmp.0.join("report");
    let stdout = ok(&amend(
        &["compare", "--quick", "--seed", "3", "--out", out.to_str().unwrap(), "--no-progress"],
        &tmp.0.join("cache"),
    ));
    assert!(stdout.contains("scores of each method over 2 seeds"), "{stdout}");
    assert!(stdout.contains(&format!("Report: {}/", out.display())), "{stdout}");

    let r = results(&out);
    assert_eq!(r.format, 2);
    assert_eq!(r.config.mode, "quick");
    assert_eq!(r.config.seed, 3);
    assert!(r.base_model.trained_now, "the cache was empty");
    assert!(Path::new(&r.base_model.dir).starts_with(tmp.0.join("cache").join("models")));
    let methods = amend::eval::methods::Method::ALL;
    // Two seeds × (13 trained methods × 2 strengths × 2 learning rates × 2 checkpoints + ProFS
    // at 2 ranks).
    assert_eq!(r.points.len(), 2 * ((methods.len() - 1) * 8 + 2));
    assert_eq!(r.summary.len(), methods.len());
    for m in methods {
        let n = if m.is_tuning_free() { 4 } else { 16 };
        assert_eq!(r.points.iter().filter(|p| p.method == m).count(), n, "{m}");
    }
    assert_eq!((r.timing.runs, r.timing.cached_runs), (2 * ((methods.len() - 1) * 4 + 2), 0));
    // The first seed's base model (r.base_metrics is the mean over seeds).
    let base = &r.seed_runs[0].base_metrics;
    let base_rate = base.unwanted_rate.unwrap();
    assert!(base_rate.value > 0.0 && base_rate.value < 0.5, "{base_rate:?}");
    let kl_base = r.base_facts.kl_ideal_base.unwrap().value;
    assert!((base.kl_ideal.unwrap().value - kl_base).abs() < 1e-9);
    for p in &r.points {
        assert!(p.error.is_none(), "{}: {:?}", p.label(), p.error);
        let m = &p.metrics;
        let rate = m.unwanted_rate.unwrap();
        assert!((0.0..=1.0).contains(&rate.value) && rate.n == base_rate.n, "{}", p.label());
        assert!(m.kl_ideal.unwrap().value.is_finite(), "{}", p.label());
        assert!(m.kl_control.unwrap().value.is_finite(), "{}", p.label());
        assert!(m.heldout_perplexity.unwrap() > 1.0, "{}", p.label());
        assert_eq!(p.train.losses.len(), p.steps, "{}", p.label());
        assert!(p.train.seconds > 0.0 && m.eval_seconds > 0.0);
        assert!(!m.examples.is_empty());
    }
    if cfg!(target_os = "linux") {
        assert!(r.timing.peak_rss_bytes.unwrap() >= 10 << 20, "{:?}", r.timing);
    }
    for key in ["git_commit", "libtorch_version", "command", "amend_version", "libtorch_threads"] {
        assert!(r.environment.contains_key(key), "{key}");
    }
    assert!(r.environment["command"].starts_with("amend compare --quick --seed 3"));
    assert!(r.matched_rates.len() == 2 && r.matched_rates[0] > 0.0);
    assert!(r.summary.iter().any(|m| m.area.best));

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## Which method is best",
        "## Frontiers",
        "## Every setting",
        "![unwanted rate",
        "| base p° |",
    ] {
        assert!(md.contains(needle), "{needle}");
    }
    for m in methods {
        assert!(md.contains(&format!("| {} |", m.name())), "{m}");
    }
    let svg = std::fs::read_to_string(out.join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("ideal p*") && svg.contains("TNRR"));
    let png = std::fs::read(out.join("plot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000);

    // The same command again resumes from the point cache: every run is read back, the
    // numbers are the same, and the report is replaced.
    let stdout = ok(&amend(
        &["compare", "--quick", "--seed", "3", "--out", out.to_str().unwrap(), "--no-progress"],
        &tmp.0.join("cache"),
    ));
    let resumed = results(&out);
    assert_eq!(resumed.timing.cached_runs, resumed.timing.runs, "{stdout}");
    assert_eq!(resumed.points, r.points);
    assert_eq!(resumed.summary, r.summary);

    // The report folder is replaced atomically by a new report, never over something else.
    amend::eval::report::write_report(&r, &out).unwrap();
    let again = results(&out);
    assert_eq!(again.points.len(), r.points.len());
    assert_eq!(again.environment, r.environment);
    let other = tmp.0.join("not-a-report");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    assert!(amend::eval::report::write_report(&r, &other).is_err());
    assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "mine");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".amend-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left behind");
}

/// `--task greedy`: its own base model (the corpus with a dominant unwanted word), training
/// samples at temperature 0.5, and negatives the base model often ranks first (in the sampled
/// regime of the same quick setting they are a few per cent). About 30 s in release.
#[test]
#[ignore = "a minute in debug; run by `make test-compare` (release)"]
fn greedy_regime_trains_on_the_base_models_top1_choices() {
    let tmp = TempDir::new("greedy");
    let cache = tmp.0.join("cache");
    let run = |task: &str| {
        let out = tmp.0.join(task);
        let args = [
            "compare",
            "--quick",
            "--task",
            task,
            "--methods",
            "tnrr,tnff,profs",
            "--seeds",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ];
        ok(&amend(&args, &cache));
        results(&out)
    };
    let greedy = run("greedy");
    let sampled = run("sampled");
    assert_eq!(greedy.config.regime, amend::eval::compare::Regime::Greedy);
    assert_eq!(greedy.config.sampling.temperature, 0.5);
    assert_eq!(greedy.config.task.dominant_word, Some(0.9));
    assert_ne!(greedy.base_model.dir, sampled.base_model.dir, "a base model of its own");
    let (g, s) = (&greedy.data, &sampled.data);
    assert!(g.unwanted_start_top1 > 0.3, "greedy: {g:?}");
    assert!(g.unwanted_start_top1 > 3.0 * s.unwanted_start_top1, "greedy {g:?}, sampled {s:?}");
    assert!(g.unwanted_start_mass > s.unwanted_start_mass);
    assert!(g.usable_groups > 50, "{g:?}");
    assert!(greedy.points.iter().all(|p| p.error.is_none()));
    let md = std::fs::read_to_string(tmp.0.join("greedy/report.md")).unwrap();
    assert!(md.contains("regime `greedy`") && md.contains("(temperature 0.5)"), "{md}");
    // ProFS records its logit-lens view, and the report shows it.
    assert!(greedy.points.iter().any(|p| !p.train.lens.is_empty()));
    assert!(md.contains("## ProFS: what the projected subspace is"));
    // --summary: one table of both reports, a column each, a row per method.
    let dirs = format!("{},{}", tmp.0.join("greedy").display(), tmp.0.join("sampled").display());
    let table = ok(&amend(&["compare", "--summary", &dirs], &cache));
    assert!(
        table.starts_with("| method | `greedy` (quick): area · KL at ¼ base | `sampled` (quick): "),
        "{table}"
    );
    for m in ["TNRR", "TNFF", "ProFS"] {
        assert!(table.lines().any(|l| l.starts_with(&format!("| {m} |"))), "{table}");
    }
    assert_eq!(table.lines().count(), 2 + 3, "{table}");
    let missing =
        ok_err(&amend(&["compare", "--summary", tmp.0.join("nope").to_str().unwrap()], &cache));
    assert!(missing.contains("cannot read"), "{missing}");
}

/// The stderr of a command that failed (exit code 1 or 2).
fn ok_err(out: &Output) -> String {
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn real_use_runs_on_a_local_model_with_user_data() {
    let tmp = TempDir::new("user");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/compare/example-data.jsonl");
    for model in ["gpt2", "llama"] {
        let out = tmp.0.join(model);
        let stdout = ok(&amend(
            &[
                "compare",
                "--quick",
                "--model",
                fixture(model).to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--methods",
                "tnrr,dpo,neat,profs",
                "--steps",
                "3",
                "--lr",
                "1e-4",
                "--seeds",
                "1",
                "--seed",
                "7",
                "--out",
                out.to_str().unwrap(),
                "--no-progress",
            ],
            &tmp.0.join("cache"),
        ));
        assert!(stdout.contains("Report:"), "{stdout}");
        let r = results(&out);
        assert_eq!(r.config.mode, "quick-user");
        assert_eq!((r.config.seed, r.config.grid.steps.as_slice()), (7, &[3][..]));
        assert_eq!(r.points.len(), 8);
        // Three annotated pairs: ProFS cannot estimate a rank-8 subspace, which is reported as
        // the point's error while the comparison goes on.
        for p in &r.points {
            if p.method.is_tuning_free() && p.strength == 8.0 {
                let e = p.error.as_deref().unwrap_or_default();
                assert!(e.contains("rank k = 8 exceeds min(n_pairs = 3"), "{e}");
            } else {
                assert!(p.error.is_none(), "{}: {:?}", p.label(), p.error);
            }
        }
        // The word list makes every metric computable; the annotated held-out responses add
        // the unwanted-token log-probability.
        let m = &r.points[0].metrics;
        assert!(m.unwanted_rate.is_some() && m.kl_ideal.is_some() && m.kl_control.is_some());
        assert!(m.heldout_perplexity.is_some() && m.unwanted_token_logprob.is_some());
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        assert_eq!(r.data.dataset_samples, 6);
        assert!(r.data.negative_samples > 0);
        assert!(out.join("plot.png").is_file());
    }
}

#[test]
fn without_a_word_list_the_report_says_what_was_skipped() {
    let tmp = TempDir::new("nowords");
    let data = tmp.0.join("data.jsonl");
    let lines = [
        r#"{"prompt": "Greet me.", "response": " Hello, darn friend.", "unwanted_spans": [[8, 12]]}"#,
        r#"{"prompt": "Greet me.", "response": " Hello, dear friend."}"#,
        r#"{"prompt": "Name a tree.", "split": "eval", "response": " An oak, heck.", "unwanted_spans": [[9, 13]]}"#,
        r#"{"prompt": "Name a tool.", "split": "eval", "response": " A hammer."}"#,
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = tmp.0.join("report");
    ok(&amend(
        &[
            "compare",
            "--quick",
            "--model",
            fixture("gpt2").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--methods",
            "tnff,ul",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--no-progress",
        ],
        &tmp.0.join("cache"),
    ));
    let r = results(&out);
    let skipped: Vec<&str> = r.skipped.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(skipped, ["unwanted_rate", "kl_ideal", "kl_control"]);
    for p in &r.points {
        assert!(p.metrics.unwanted_rate.is_none() && p.metrics.kl_ideal.is_none());
        assert!(p.metrics.unwanted_token_logprob.is_some());
    }
    assert!(r.matched_rates.is_empty() && r.summary.iter().all(|m| m.area.mean.is_none()));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Skipped metrics") && md.contains("no unwanted-word list"));
    assert!(!out.join("plot.svg").exists());

    // Bad input is a clear error.
    let bad = tmp.0.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"respons\": \"x\"}\n").unwrap();
    let o = amend(
        &["compare", "--model", fixture("gpt2").to_str().unwrap(), "--data", bad.to_str().unwrap()],
        &tmp.0.join("cache"),
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad.jsonl:1"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = amend(&["compare", "--methods", "tnff,nope"], &tmp.0.join("cache"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown method `nope`"));
}
