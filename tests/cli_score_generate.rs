//! `amend score` and `amend generate` on the tiny GPT-2 fixture of amend-models.

use std::path::PathBuf;
use std::process::Command;

use amend::models::CausalLm;

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

/// Whether two perplexities of the same text agree to f32 rounding. The CLI and the library
/// run the same f32 kernels, but with different libtorch thread counts (other tests of this
/// binary change the in-process one), which reorders the log-sum-exp and mean reductions: the
/// mean NLL `ln ppl` may then differ by some tens of f32 ulps of itself.
fn same_perplexity(a: f64, b: f64) -> bool {
    let (la, lb) = (a.ln(), b.ln());
    (la - lb).abs() <= 64.0 * f64::from(f32::EPSILON) * la.abs().max(lb.abs()).max(1.0)
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
    assert!(same_perplexity(t["perplexity"].as_f64().unwrap(), s[0].perplexity()));
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

fn long_text(words: usize) -> String {
    let base = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away"];
    (0..words).map(|i| base[i % base.len()]).collect::<Vec<_>>().join(" ")
}

fn stderr(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "should fail: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "nothing is printed on stdout");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn score_refuses_texts_longer_than_the_context_and_offers_a_cap_or_windows() {
    let dir = fixture();
    let d = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("long.txt");
    std::fs::write(&file, long_text(200)).unwrap();
    let f = file.to_str().unwrap();
    let model = amend::models::load(&dir, &Default::default()).unwrap();
    let n = model.tokenizer().unwrap().encode(&long_text(200), true).unwrap().len();

    let err = stderr(&amend(&["score", "--model", d, "--file", f, "--threads", "1"]));
    let want = format!(
        "the text of {f} has {n} tokens, more than the model's context of 64 tokens \
         (`n_positions` in {}); nothing was scored: pass --max-tokens N",
        dir.join("config.json").display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("--stride S to score all of it in overlapping windows of 64"), "{err}");

    // With --lines the message names the line.
    std::fs::write(&file, format!("the cat\n\n{}\n", long_text(200))).unwrap();
    let err = stderr(&amend(&["score", "--model", d, "--file", f, "--lines", "--threads", "1"]));
    assert!(err.contains(&format!("line 3 of {f} has {n} tokens")), "{err}");
    let err =
        stderr(&amend(&["score", "--model", d, "--text", "the cat", "--text", &long_text(200)]));
    assert!(err.contains(&format!("--text number 2 has {n} tokens")), "{err}");

    // --max-tokens: the first N tokens; the JSON says how many were cut.
    std::fs::write(&file, long_text(200)).unwrap();
    let v = json(&amend(&["score", "--model", d, "--file", f, "--max-tokens", "20", "--json"]));
    assert_eq!(v["texts"][0]["num_scored"], 19);
    assert_eq!(v["texts"][0]["truncated_tokens"].as_u64().unwrap() as usize, n - 20);
    let out = amend(&["score", "--model", d, "--file", f, "--max-tokens", "20"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("text 1: 20 tokens (the last {} cut by --max-tokens)", n - 20)));
    let err = stderr(&amend(&["score", "--model", d, "--file", f, "--max-tokens", "100"]));
    assert!(err.contains("give a --max-tokens of at most 64"), "{err}");

    // --stride: every token scored, as the library does it.
    let v = json(&amend(&["score", "--model", d, "--file", f, "--stride", "16", "--json"]));
    let opts = amend::models::ScoreOptions { stride: Some(16), ..Default::default() };
    let s = amend::models::score_texts(&model, &[&long_text(200)], &opts).unwrap();
    assert_eq!(v["texts"][0]["num_scored"].as_u64().unwrap() as usize, n - 1);
    let ppl = v["texts"][0]["perplexity"].as_f64().unwrap();
    assert!(same_perplexity(ppl, s[0].perplexity()), "{ppl} {}", s[0].perplexity());
    let err = stderr(&amend(&["score", "--model", d, "--file", f, "--stride", "64"]));
    assert!(
        err.contains("--stride: must be at least 1 and smaller than the window of 64"),
        "{err}"
    );
    let err = stderr(&amend(&["score", "--model", d, "--file", f, "--max-tokens", "0"]));
    assert!(err.contains("--max-tokens"), "{err}");
}

#[cfg(unix)]
#[test]
fn corrupt_or_looping_weights_are_described_in_words() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    std::fs::create_dir(&d).unwrap();
    for f in std::fs::read_dir(fixture()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
    }
    let w = d.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    let ds = d.to_str().unwrap();
    let score = || stderr(&amend(&["score", "--model", ds, "--text", "the cat", "--threads", "1"]));
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = score();
    assert!(err.contains(&format!("{}: the file has {} bytes", w.display(), bytes.len() / 2)));
    std::fs::remove_file(&w).unwrap();
    std::os::unix::fs::symlink("b", &w).unwrap();
    std::os::unix::fs::symlink("model.safetensors", d.join("b")).unwrap();
    let err = score();
    assert!(err.contains(&format!("{}: it is a loop of symbolic links", w.display())), "{err}");
    assert!(!err.contains("no model.safetensors"), "{err}");
}

#[test]
fn texts_with_nothing_to_score_are_refused_not_given_perplexity_one() {
    let dir = fixture();
    let d = dir.to_str().unwrap();
    // An empty text with --prepend-bos is one token: nothing can be scored.
    let err = stderr(&amend(&["score", "--model", d, "--text", "", "--prepend-bos"]));
    assert!(
        err.contains("--text has 1 token (with the --prepend-bos token): nothing to score"),
        "{err}"
    );
    let err = stderr(&amend(&["score", "--model", d, "--text", "the cat", "--text", ""]));
    assert!(err.contains("--text number 2 has 0 tokens: nothing to score"), "{err}");
    assert!(!err.contains("perplexity"), "{err}");
}

#[test]
fn non_finite_weights_are_refused_naming_file_and_tensor_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model_dir.join(e.file_name())).unwrap();
    }
    let weights = model_dir.join("model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&weights).unwrap();
    let name = "h.1.mlp.c_proj.weight";
    let t = &mut tensors.iter_mut().find(|(n, _)| n.ends_with(name)).expect(name).1;
    let _ = t.get(3).get(5).fill_(f64::NAN);
    let full = tensors.iter().find(|(n, _)| n.ends_with(name)).unwrap().0.clone();
    tch::Tensor::write_safetensors(&tensors, &weights).unwrap();
    let d = model_dir.to_str().unwrap();
    for args in [
        vec!["score", "--model", d, "--text", "the cat"],
        vec!["generate", "--model", d, "--prompt", "the cat", "--max-new-tokens", "2"],
    ] {
        let err = stderr(&amend(&args));
        let want = format!(
            "{}: tensor `{full}` holds 1 non-finite value (the first, at [3, 5], is NaN) in the file",
            weights.display()
        );
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(err.contains("--allow-non-finite-weights"), "{err}");
        // Allowed explicitly: it loads, and the NaN shows in the output rather than as 1.0.
        let mut allowed = args.clone();
        allowed.push("--allow-non-finite-weights");
        let out = amend(&allowed);
        assert!(out.status.success(), "{allowed:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The edit commands load the same way, and refuse before any work (nothing written).
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let (pairs, edits) = (examples.join("profs_pairs.jsonl"), examples.join("edits.jsonl"));
    let out = tmp.path().join("edited");
    let o = out.to_str().unwrap();
    for args in [
        vec!["edit", "project", "--model", d, "--pairs", pairs.to_str().unwrap(), "--out", o],
        vec!["edit", "finetune", "--model", d, "--edits", edits.to_str().unwrap(), "--out", o],
    ] {
        let err = stderr(&amend(&args));
        assert!(err.contains(&format!("tensor `{full}` holds 1 non-finite value")), "{err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
}
