//! Machine limits and numeric knobs on the command line: thread counts, configurations too large
//! for the machine, fine-tuning layers and learning rates. Each is a clear error before any work.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    root().join("crates/amend-models/tests/fixtures/models/gpt2")
}

fn example(name: &str) -> String {
    root().join("docs/examples").join(name).to_string_lossy().into_owned()
}

fn amend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// The command failed with `code`, printed nothing on stdout, and its stderr.
#[track_caller]
fn fails(out: &std::process::Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn thread_counts_outside_the_machine_are_refused_by_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture();
    let m = m.to_str().unwrap();
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    let commands: Vec<Vec<String>> = [
        vec!["score", "--model", m, "--text", "the cat"],
        vec!["generate", "--model", m, "--prompt", "the cat"],
        vec!["loss", "nll", "--inputs", "batch.safetensors", "--out", o],
        vec!["edit", "project", "--model", m, "--pairs", &example("profs_pairs.jsonl"), "--out", o],
        vec!["edit", "finetune", "--model", m, "--edits", &example("edits.jsonl"), "--out", o],
        vec!["compare", "--quick", "--out", o],
    ]
    .into_iter()
    .map(|c| c.into_iter().map(String::from).collect())
    .collect();
    for cmd in &commands {
        for n in ["0", "-1", "100000"] {
            let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let flag = format!("--threads={n}");
            args.push(&flag);
            let err = fails(&amend(&args), 2);
            assert!(err.contains("the thread count must be between 1 and"), "{args:?}: {err}");
            assert!(err.contains("logical CPU"), "{err}");
            assert!(!out.exists(), "{args:?} wrote an output");
        }
    }
}

#[test]
fn a_configuration_larger_than_the_machine_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("huge");
    copy_dir(&fixture(), &dir);
    let config = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    cfg["n_layer"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let d = dir.to_str().unwrap();
    for args in [
        vec!["score", "--model", d, "--text", "the cat"],
        vec!["generate", "--model", d, "--prompt", "the cat", "--max-new-tokens", "2"],
    ] {
        let err = fails(&amend(&args), 1);
        assert!(err.contains(&config.display().to_string()), "{err}");
        assert!(err.contains("more than this machine's memory"), "{err}");
        assert!(err.contains("n_layer"), "{err}");
    }
}

#[test]
fn finetune_names_missing_layers_as_given_and_a_diverging_learning_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture();
    let out = tmp.path().join("ft");
    let (m, edits, o) = (m.to_str().unwrap(), example("edits.jsonl"), out.to_str().unwrap());
    let base = |extra: &[&str]| {
        let mut args = vec!["edit", "finetune", "--model", m, "--edits", &edits, "--out", o];
        args.extend(["--threads", "1", "--quiet"]);
        args.extend_from_slice(extra);
        amend(&args)
    };
    // The fixture has 2 layers: 2..9 asks for layers 2 to 8.
    let err = fails(&base(&["--layers", "2..9"]), 1);
    assert!(err.contains("layer 2 does not exist: the model has 2 layers (0..2)"), "{err}");
    assert!(err.contains("requested layers: 2..9"), "{err}");
    assert!(!out.exists());
    // A learning rate that blows the weights up is named, not a loss setting.
    let err = fails(&base(&["--layers", "1", "--lr", "1e30", "--epochs", "3"]), 1);
    assert!(err.contains("training diverged after"), "{err}");
    assert!(err.contains("lower the learning rate"), "{err}");
    assert!(!err.contains("non_finite"), "a setting the CLI does not offer: {err}");
    assert!(!out.exists(), "a failed edit leaves nothing");
}
