//! `amend edit project` and `amend edit finetune` on the tiny GPT-2 fixture with the example
//! data files of `docs/examples/`.

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

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn project_writes_an_edited_model_with_manifest_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("profs");
    let metrics = tmp.path().join("m.json");
    let model = fixture();
    let stdout = ok(&amend(&[
        "edit",
        "project",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        &example("profs_pairs.jsonl"),
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "0..2",
        "--rank",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--metrics",
        metrics.to_str().unwrap(),
    ]));
    assert!(stdout.contains("ProFS: layers 0..2, k = 2, 6 pairs"), "{stdout}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "amend_edit.json",
        "amend_edit_metrics.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let m = json(&out.join("amend_edit.json"));
    assert_eq!(m["method"], "profs");
    assert_eq!(m["edited_keys"].as_array().unwrap().len(), 2);
    let metrics = json(&metrics);
    assert_eq!(metrics["report"]["k"], 2);
    assert!(metrics["dispreferred_mean_nll"]["post"].is_number());
    let edited = amend::models::load(&out, &Default::default()).unwrap();
    let orig = amend::models::load(&model, &Default::default()).unwrap();
    use amend::models::CausalLm;
    let key = "transformer.h.0.mlp.c_proj.weight";
    assert!(!edited.params().tensor(key).unwrap().equal(orig.params().tensor(key).unwrap()));
    assert!(
        edited
            .params()
            .tensor("transformer.wte.weight")
            .unwrap()
            .equal(orig.params().tensor("transformer.wte.weight").unwrap())
    );

    // Pinned pairs.
    let idx = tmp.path().join("idx.txt");
    std::fs::write(&idx, "4\n0\n2\n").unwrap();
    let pinned = tmp.path().join("pinned");
    let stdout = ok(&amend(&[
        "edit",
        "project",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        &example("profs_pairs.jsonl"),
        "--out",
        pinned.to_str().unwrap(),
        "--layers",
        "1..2",
        "--rank",
        "1",
        "--indices",
        idx.to_str().unwrap(),
        "--threads",
        "1",
        "--quiet",
    ]));
    assert!(stdout.contains("3 pairs"), "{stdout}");
    let m = json(&pinned.join("amend_edit_metrics.json"));
    assert_eq!(m["report"]["pair_indices"]["preferred"], serde_json::json!([4, 0, 2]));

    // Existing output without --overwrite, a layer range past the model, a rank above the
    // number of pairs, no default for this model: clear errors, non-zero exit.
    let again = amend(&[
        "edit",
        "project",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        &example("profs_pairs.jsonl"),
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "0..2",
        "--rank",
        "2",
        "--quiet",
    ]);
    assert!(!again.status.success());
    for (args, needle) in [
        (vec!["--layers", "1..3", "--rank", "1"], "layer range 1..3"),
        (vec!["--layers", "0..2", "--rank", "7"], "exceeds min(n_pairs = 6"),
        (vec![], "no default layers / rank"),
    ] {
        let o = tmp.path().join("bad");
        let mut a = vec!["edit", "project", "--model", model.to_str().unwrap(), "--pairs"];
        let p = example("profs_pairs.jsonl");
        a.push(&p);
        a.extend(["--out", o.to_str().unwrap(), "--quiet"]);
        a.extend(args);
        let r = amend(&a);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!o.exists());
    }
    // A malformed pairs file names the line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"preferred\": \"a\", \"dispreferred\": \"b\"}\n{\"preferred\": \"a\"}\n",
    )
    .unwrap();
    let r = amend(&[
        "edit",
        "project",
        "--model",
        model.to_str().unwrap(),
        "--pairs",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("x").to_str().unwrap(),
        "--layers",
        "0..1",
        "--rank",
        "1",
    ]);
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
}

#[test]
fn finetune_batched_and_single() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture();
    let out = tmp.path().join("ftm");
    let stdout = ok(&amend(&[
        "edit",
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--edits",
        &example("edits.jsonl"),
        "--out",
        out.to_str().unwrap(),
        "--method",
        "ft-m-aug",
        "--layers",
        "1",
        "--lr",
        "1e-2",
        "--epochs",
        "3",
        "--locality-pool",
        &example("locality_pool.jsonl"),
        "--threads",
        "1",
        "--quiet",
    ]));
    assert!(stdout.contains("ft-m-aug (Batched): 3 edits, rows E/P/R = 3/30/12"), "{stdout}");
    let m = json(&out.join("amend_edit_metrics.json"));
    assert_eq!(m["outcome"]["metrics"]["memit_prob"]["post"]["protocol"], "memit-prob");
    assert!(
        m["outcome"]["metrics"]["easyedit_tokacc"]["post"]["portability"]["one_hop"].is_number()
    );
    assert_eq!(json(&out.join("amend_edit.json"))["method"], "finetune");
    assert!(amend::models::load(&out, &Default::default()).is_ok());

    let single = tmp.path().join("single");
    let stdout = ok(&amend(&[
        "edit",
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--edits",
        &example("edits.jsonl"),
        "--out",
        single.to_str().unwrap(),
        "--method",
        "ft-l",
        "--mode",
        "single",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--quiet",
    ]));
    assert!(stdout.contains("restored exactly: true"), "{stdout}");
    assert!(single.join("amend_edit_metrics.json").is_file());
    assert!(!single.join("model.safetensors").exists());

    // An edit whose target is empty: the error names the request and the field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"target_new\": \"b\"}\n{\"prompt\": \"c\", \"target_new\": \" \"}\n",
    )
    .unwrap();
    let r = amend(&[
        "edit",
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--edits",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("y").to_str().unwrap(),
        "--quiet",
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("edit request 1: field `target_new`"), "{err}");
}

#[test]
fn help_explains_the_commands() {
    let h = ok(&amend(&["edit", "--help"]));
    assert!(h.contains("project") && h.contains("finetune"));
    let h = ok(&amend(&["edit", "finetune", "--help"]));
    assert!(h.contains("--edits") && h.contains("single") && h.contains("docs/editing-data.md"));
    let h = ok(&amend(&["edit", "project", "--help"]));
    assert!(h.contains("--pairs") && h.contains("--rank") && h.contains("A..B"));
}

#[test]
fn output_never_over_or_inside_the_input() {
    let tmp = tempfile::tempdir().unwrap();
    // A private copy of the fixture, so a failure of this test cannot damage the fixture.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), model.join(f)).unwrap();
    }
    let m = model.to_str().unwrap();
    let inside = model.join("edited");
    let edits = example("edits.jsonl");
    let pairs = example("profs_pairs.jsonl");
    let cases: Vec<Vec<&str>> = vec![
        // Single mode writes only metrics, with --overwrite: still never over the input.
        vec!["finetune", "--edits", &edits, "--mode", "single", "--out", m, "--overwrite"],
        vec!["finetune", "--edits", &edits, "--out", inside.to_str().unwrap()],
        vec![
            "project",
            "--pairs",
            &pairs,
            "--layers",
            "0..1",
            "--rank",
            "1",
            "--out",
            m,
            "--overwrite",
        ],
        vec!["project", "--pairs", &pairs, "--layers", "0..1", "--rank", "1", "--out", "."],
    ];
    for case in cases {
        let mut args = vec!["edit", case[0], "--model", m, "--quiet", "--threads", "1"];
        args.extend(&case[1..]);
        // Run from inside the model directory so that `--out .` is the input itself.
        let r = Command::new(env!("CARGO_BIN_EXE_amend"))
            .args(&args)
            .current_dir(&model)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!r.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("the input --model"), "{args:?}: {err}");
        assert!(!inside.exists());
        for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
            assert_eq!(
                std::fs::read(model.join(f)).unwrap(),
                std::fs::read(fixture().join(f)).unwrap(),
                "{f} changed by {args:?}"
            );
        }
    }
    // The library writer refuses the same, even when the CLI check is bypassed.
    let files = [("a.json".to_string(), b"{}".to_vec())].into();
    let e = amend::edit::manifest::write_dir_atomically(&model, &files, true, Some(&model))
        .unwrap_err();
    assert!(e.to_string().contains("input directory"), "{e}");
    let e = amend::edit::manifest::write_dir_atomically(&inside, &files, false, Some(&model))
        .unwrap_err();
    assert!(e.to_string().contains("input directory"), "{e}");
    let ok = tmp.path().join("metrics-only");
    amend::edit::manifest::write_dir_atomically(&ok, &files, false, Some(&model)).unwrap();
    assert_eq!(std::fs::read(ok.join("a.json")).unwrap(), b"{}");
}

#[test]
fn project_scores_long_pairs_with_the_max_len_truncation() {
    use amend::models::CausalLm;
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture();
    let orig = amend::models::load(&model, &Default::default()).unwrap();
    // Six pairs whose texts are each longer than the fixture's 64 positions.
    let long = |s: &str| vec![s; 20].join(" ");
    let pairs: Vec<(String, String)> = std::fs::read_to_string(example("profs_pairs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let side = |a: &str, b: &str| long(v[a].as_str().or(v[b].as_str()).unwrap());
            (side("preferred", "chosen"), side("dispreferred", "rejected"))
        })
        .collect();
    let tok = orig.tokenizer().unwrap();
    assert!(
        pairs.iter().all(|(p, d)| tok.encode(p, true).unwrap().len() > 64
            && tok.encode(d, true).unwrap().len() > 64)
    );
    let file = tmp.path().join("long.jsonl");
    let lines: Vec<String> = pairs
        .iter()
        .map(|(p, d)| serde_json::json!({"preferred": p, "dispreferred": d}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let run = |max_len: &str, out: &Path| {
        amend(&[
            "edit",
            "project",
            "--model",
            model.to_str().unwrap(),
            "--pairs",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--layers",
            "0..2",
            "--rank",
            "2",
            "--max-len",
            max_len,
            "--threads",
            "1",
            "--quiet",
        ])
    };
    let out = tmp.path().join("edited");
    ok(&run("48", &out));
    let m = json(&out.join("amend_edit_metrics.json"));
    assert_eq!(m["report"]["truncated_texts"], 12);
    // The before scores are those of the texts cut to --max-len tokens.
    let pref: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
    let want = amend::edit::metrics::mean_text_nll(&orig, &pref, 16, Some(48)).unwrap();
    let got = m["preferred_mean_nll"]["pre"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-5 * want.abs(), "{got} {want}");
    assert!(m["dispreferred_mean_nll"]["post"].as_f64().unwrap().is_finite());

    // A --max-len above the context is refused with the limit to use, before any edit.
    let out2 = tmp.path().join("too_long");
    let r = run("128", &out2);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains(
            "pair 0 (counting from 0), preferred text: 128 tokens with --max-len 128 are more \
             than the model's context of 64 tokens (`n_positions` in its config.json); pass \
             --max-len 64 or less"
        ),
        "{err}"
    );
    assert!(!out2.exists());
}
