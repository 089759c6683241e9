//! `amend score` and `amend generate` on the tiny GPT-2 fixture of amend-models.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/amend-models/tests/fixtures/models/gpt2")
}

fn amend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn score_json_matches_the_library() {
    let dir = fixture();
    let d = dir.to_str().unwrap();
    let v = json(&amend(&[
        "score",
        "--model",
        d,
        "--text",
        "the quick brown fox",
        "--prepend-bos",
        "--json",
        "--threads",
        "1",
    ]));
    let model = amend::models::load(&dir, &Default::default()).unwrap();
    let opts = amend::models::ScoreOptions { prepend_bos: true, ..Default::default() };
    let s = amend::models::score_texts(&model, &["the quick brown fox"], &opts).unwrap();
    let t = &v["texts"][0];
    assert_eq!(t["num_scored"].as_u64().unwrap() as usize, s[0].count());
    assert!(
        (t["perplexity"].as_f64().unwrap() - s[0].perplexity()).abs() < 1e-6 * s[0].perplexity()
    );
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), s[0].token_ids.len());
    assert!(tokens[0]["logprob"].is_null(), "the first token is not scored");
    assert!((tokens[1]["logprob"].as_f64().unwrap() - f64::from(s[0].logprobs[0])).abs() < 1e-6);
    // Text output ends with the summary line.
    let out = amend(&["score", "--model", d, "--text", "the cat", "--threads", "1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity"));
}

#[test]
fn generate_is_reproducible_and_honours_flags() {
    let d = fixture();
    let d = d.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        d,
        "--prompt",
        "the cat",
        "--prompt",
        "a",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.9",
        "--seed",
        "5",
        "--no-stop",
        "--json",
        "--threads",
        "1",
    ];
    let a = json(&amend(&args));
    let b = json(&amend(&args));
    assert_eq!(a["generations"], b["generations"]);
    assert_eq!(a["config"]["do_sample"], true);
    for g in a["generations"].as_array().unwrap() {
        assert_eq!(g["token_ids"].as_array().unwrap().len(), 6);
        assert_eq!(g["finish_reason"], "length");
    }
    let greedy = json(&amend(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "the",
        "--greedy",
        "--max-new-tokens",
        "3",
        "--json",
    ]));
    assert_eq!(greedy["config"]["do_sample"], false);
}

#[test]
fn bad_model_directory_fails_with_its_path() {
    let out = amend(&["score", "--model", "/nonexistent/model", "--text", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let out = amend(&[
        "generate",
        "--model",
        fixture().to_str().unwrap(),
        "--prompt",
        "x",
        "--temperature",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));
}

#[test]
fn special_ids_outside_the_vocabulary_warn_and_fail_only_where_used() {
    // A GPT-2 saved by transformers with a small vocabulary keeps GPT2Config's default
    // bos/eos 50256 (the fixture has 320 rows): transformers scores it, and so does amend.
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    for file in ["config.json", "generation_config.json"] {
        let path = tmp.path().join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["bos_token_id"] = 50256.into();
        v["eos_token_id"] = 50256.into();
        std::fs::write(&path, v.to_string()).unwrap();
    }
    let d = tmp.path().to_str().unwrap();
    let out = amend(&["score", "--model", d, "--text", "the cat", "--threads", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("config.json") && stderr.contains("bos_token_id"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity"));
    let out =
        amend(&["score", "--model", d, "--text", "the cat", "--prepend-bos", "--threads", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("config.json: `bos_token_id` = 50256 is outside"), "{stderr}");
    assert!(!stderr.contains("tokenizer has"), "{stderr}");
}
