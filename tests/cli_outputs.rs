//! Output safety of every command that writes (`amend compare`, `amend edit project`,
//! `amend edit finetune`, `amend loss`; flags `--out` and `--metrics`): an output never is,
//! contains or sits inside an input, never replaces a folder amend did not write, names the
//! path the user gave when it cannot be written, and a run killed with SIGTERM or SIGINT at any
//! moment leaves either nothing or a complete output, with its inputs byte-identical.
//! The catalogue with the exact messages is docs/bad-input.md, "Outputs and interruption".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn amend(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Runs `args`, expects a failure whose stderr contains `needle`.
fn refused(args: &[&str], needle: &str) -> String {
    let out = amend(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} should fail; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(needle), "{args:?}: expected `{needle}` in:\n{err}");
    err
}

/// Every file under `dir` (or the file itself) with its bytes.
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        } else {
            out.insert(p.clone(), b"<link>".to_vec());
        }
    }
    out
}

/// Names in `dir` starting with `.amend-` (staging folders, left-behind temporaries).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".amend-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A scratch folder with a copy of the tiny GPT-2 fixture (`model/`), its pairs and edits files.
struct Scratch {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().canonicalize().unwrap();
        let model = dir.join("model");
        std::fs::create_dir(&model).unwrap();
        let fixture = root().join("crates/amend-models/tests/fixtures/models/gpt2");
        for e in std::fs::read_dir(fixture).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
        }
        for f in ["profs_pairs.jsonl", "edits.jsonl"] {
            std::fs::copy(root().join("docs/examples").join(f), dir.join(f)).unwrap();
        }
        std::fs::copy(root().join("docs/compare/example-data.jsonl"), dir.join("data.jsonl"))
            .unwrap();
        Scratch { _tmp: tmp, dir }
    }
    fn p(&self, rel: &str) -> String {
        self.dir.join(rel).to_string_lossy().into_owned()
    }
    fn inputs(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut all = snapshot(&self.dir.join("model"));
        for f in ["profs_pairs.jsonl", "edits.jsonl", "data.jsonl"] {
            all.extend(snapshot(&self.dir.join(f)));
        }
        all
    }
    fn project(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "edit",
            "project",
            "--model",
            &self.p("model"),
            "--pairs",
            &self.p("profs_pairs.jsonl"),
            "--layers",
            "0..2",
            "--rank",
            "2",
            "--threads",
            "1",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
    fn finetune(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "edit",
            "finetune",
            "--model",
            &self.p("model"),
            "--edits",
            &self.p("edits.jsonl"),
            "--method",
            "ft-l",
            "--layers",
            "1",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--quiet",
            "--no-eval",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
    fn compare(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "compare",
            "--quick",
            "--no-progress",
            "--model",
            &self.p("model"),
            "--data",
            &self.p("data.jsonl"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `--out` that is, contains or sits inside an input, for every command with a folder output.
#[test]
fn out_folders_never_overlap_an_input() {
    let s = Scratch::new();
    let before = s.inputs();
    let cases = [
        (s.p("model"), "it is the input --model"),
        (s.p("model/report"), "it is inside the input --model"),
        (s.p(""), "it contains the input"),
        (s.p("model/../model/x/.."), "it is the input --model"),
    ];
    for (out, needle) in &cases {
        for cmd in
            [s.project(&["--out", out]), s.finetune(&["--out", out]), s.compare(&["--out", out])]
        {
            refused(&strs(&cmd), needle);
        }
        for cmd in
            [s.project(&["--out", out, "--overwrite"]), s.finetune(&["--out", out, "--overwrite"])]
        {
            refused(&strs(&cmd), needle);
        }
    }
    // The data files: --out equal to one, or holding one.
    refused(&strs(&s.compare(&["--out", &s.p("data.jsonl")])), "it is the input --data");
    refused(&strs(&s.project(&["--out", &s.p("profs_pairs.jsonl")])), "it is the input --pairs");
    refused(&strs(&s.finetune(&["--out", &s.p("edits.jsonl")])), "it is the input --edits");
    // A symbolic link to the model folder, or a path through one.
    std::os::unix::fs::symlink(s.dir.join("model"), s.dir.join("alias")).unwrap();
    refused(&strs(&s.compare(&["--out", &s.p("alias")])), "it is the input --model");
    refused(&strs(&s.project(&["--out", &s.p("alias/out")])), "it is inside the input --model");
    // The embedded task's model cache is an input too.
    let cache = s.p("cache");
    std::fs::create_dir(&cache).unwrap();
    refused(
        &["compare", "--quick", "--cache-dir", &cache, "--out", &s.p("cache/r")],
        "it is inside the input --cache-dir",
    );
    refused(
        &["edit", "project", "--cache-dir", &cache, "--out", &s.p("cache/e"), "--quiet"],
        "it is inside the input --cache-dir",
    );
    std::fs::remove_file(s.dir.join("alias")).unwrap();
    std::fs::remove_dir(&cache).unwrap();
    assert_eq!(before, s.inputs(), "inputs changed");
    assert_eq!(leftovers(&s.dir), Vec::<String>::new());
    assert!(!s.dir.join("model/report").exists());
}

/// `--metrics` may name no input, nor sit inside (or be) --out.
#[test]
fn metrics_never_names_an_input_or_the_out_folder() {
    let s = Scratch::new();
    let before = s.inputs();
    let out = s.p("out");
    for metrics in ["model/model.safetensors", "model/config.json", "model/new.json"] {
        for cmd in [
            s.project(&["--out", &out, "--metrics", &s.p(metrics)]),
            s.finetune(&["--out", &out, "--metrics", &s.p(metrics)]),
        ] {
            refused(&strs(&cmd), "--metrics");
        }
    }
    refused(
        &strs(&s.project(&["--out", &out, "--metrics", &s.p("profs_pairs.jsonl")])),
        "it is the input --pairs",
    );
    refused(
        &strs(&s.finetune(&["--out", &out, "--metrics", &s.p("edits.jsonl")])),
        "it is the input --edits",
    );
    // A hard link to an input is the input.
    std::fs::hard_link(s.dir.join("edits.jsonl"), s.dir.join("hard.json")).unwrap();
    refused(
        &strs(&s.finetune(&["--out", &out, "--metrics", &s.p("hard.json")])),
        "it is the input --edits",
    );
    std::fs::remove_file(s.dir.join("hard.json")).unwrap();
    refused(
        &strs(&s.project(&["--out", &out, "--metrics", &s.p("out/amend_edit_metrics.json")])),
        "it is inside the output --out",
    );
    refused(&strs(&s.project(&["--out", &out, "--metrics", &out])), "it is the output --out");
    std::fs::create_dir(s.dir.join("adir")).unwrap();
    refused(&strs(&s.project(&["--out", &out, "--metrics", &s.p("adir")])), "it is a folder");
    assert_eq!(before, s.inputs(), "inputs changed");
    assert!(!s.dir.join("out").exists(), "a refused run wrote --out");
}

/// Existing output folders: only an earlier amend output holding nothing else is replaced.
#[test]
fn existing_out_folders_are_replaced_only_when_amend_wrote_everything_in_them() {
    let s = Scratch::new();
    let mine = s.dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let m = mine.to_string_lossy().into_owned();
    refused(&strs(&s.project(&["--out", &m])), "it exists; pass --overwrite");
    for cmd in [
        s.project(&["--out", &m, "--overwrite"]),
        s.finetune(&["--out", &m, "--overwrite"]),
        s.compare(&["--out", &m]),
    ] {
        refused(&strs(&cmd), "is not an earlier amend output");
    }
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"mine");

    // An earlier amend output: replaced; with a file the user added: refused, file kept.
    let out = s.p("out");
    let metrics = s.p("m.json");
    let first = amend(&strs(&s.project(&["--out", &out, "--metrics", &metrics])));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.join("out/amend_output.json")).unwrap())
            .unwrap();
    assert!(marker["files"].as_array().unwrap().iter().any(|f| f == "model.safetensors"));
    std::fs::write(s.dir.join("out/notes.txt"), "mine").unwrap();
    for cmd in [s.project(&["--out", &out, "--overwrite"]), s.compare(&["--out", &out])] {
        refused(&strs(&cmd), "also holds files amend did not write (notes.txt)");
    }
    assert_eq!(std::fs::read(s.dir.join("out/notes.txt")).unwrap(), b"mine");
    std::fs::remove_file(s.dir.join("out/notes.txt")).unwrap();
    let again = amend(&strs(&s.finetune(&["--out", &out, "--overwrite", "--metrics", &metrics])));
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.join("out/amend_edit.json")).unwrap()).unwrap();
    assert_eq!(manifest["method"], "finetune");
    // An existing file where a folder goes.
    refused(&strs(&s.compare(&["--out", &metrics])), "it exists and is not a folder");
    assert_eq!(leftovers(&s.dir), Vec::<String>::new());
}

/// Outputs that cannot be written are refused before any work, naming the path the user gave.
#[test]
fn unwritable_outputs_name_the_given_path_and_leave_nothing() {
    let s = Scratch::new();
    let before = s.inputs();
    // /proc accepts no new files, even for root.
    for cmd in [
        s.project(&["--out", "/proc/amend-out"]),
        s.finetune(&["--out", "/proc/amend-out"]),
        s.compare(&["--out", "/proc/amend-out"]),
    ] {
        let err = refused(&strs(&cmd), "--out /proc/amend-out: it cannot be written");
        assert!(
            !err.contains(".amend-tmp-") || err.contains("cannot create files in /proc"),
            "{err}"
        );
    }
    let out = s.p("out");
    refused(
        &strs(&s.project(&["--out", &out, "--metrics", "/proc/amend-m.json"])),
        "--metrics /proc/amend-m.json: it cannot be written",
    );
    // A parent that is a file.
    refused(&strs(&s.project(&["--out", &s.p("data.jsonl/out")])), "is not a folder");
    assert!(!s.dir.join("out").exists());
    assert_eq!(before, s.inputs());
}

/// `amend loss --out`: never an input (also through a link), never a folder, unwritable named.
#[test]
fn loss_out_is_checked_like_every_output() {
    use tch::{Device, Kind, Tensor};
    let s = Scratch::new();
    let inputs = s.dir.join("batch.safetensors");
    let logits = Tensor::randn([1, 4, 7], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([1, 4]);
    let weights = Tensor::from_slice(&[1i64, -1, 0, 1]).reshape([1, 4]);
    Tensor::write_safetensors(
        &[("logits", &logits), ("labels", &labels), ("weights", &weights)],
        &inputs,
    )
    .unwrap();
    let config = s.dir.join("cfg.json");
    std::fs::write(&config, "{}").unwrap();
    let before = (std::fs::read(&inputs).unwrap(), std::fs::read(&config).unwrap());
    let i = inputs.to_string_lossy().into_owned();
    let c = config.to_string_lossy().into_owned();
    let base = ["loss", "nl", "--inputs", &i, "--config", &c, "--threads", "1", "--out"];
    let run = |out: &str, needle: &str| {
        let mut v = base.to_vec();
        v.push(out);
        refused(&v, needle)
    };
    run(&i, "it is the input --inputs");
    run(&c, "it is the input --config");
    std::os::unix::fs::symlink(&inputs, s.dir.join("link.safetensors")).unwrap();
    run(&s.p("link.safetensors"), "it is the input --inputs");
    std::fs::hard_link(&inputs, s.dir.join("hard.safetensors")).unwrap();
    run(&s.p("hard.safetensors"), "it is the input --inputs");
    run(&s.p("model"), "it is a folder");
    run("/proc/amend-loss.safetensors", "--out /proc/amend-loss.safetensors: it cannot be written");
    assert_eq!(before, (std::fs::read(&inputs).unwrap(), std::fs::read(&config).unwrap()));
    let mut v = base.to_vec();
    let good = s.p("out.safetensors");
    v.push(&good);
    let ok = amend(&v);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(leftovers(&s.dir), Vec::<String>::new());
}

/// Staging folders of dead runs are removed by the next run that writes next to them; folders
/// without an owner file (not amend's) and those of live processes are kept.
#[test]
fn stale_staging_folders_of_dead_runs_are_removed_on_the_next_run() {
    let s = Scratch::new();
    let Ok(boot) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else { return };
    let dead = s.dir.join(".amend-tmp-4294967294-dead");
    std::fs::create_dir_all(dead.join("new")).unwrap();
    std::fs::write(dead.join("new/model.safetensors"), "half").unwrap();
    let owner = serde_json::json!({
        "pid": 4294967294u32, "start": 1, "boot": boot.trim(), "target": s.dir.join("out"),
    });
    std::fs::write(dead.join(".amend-owner"), owner.to_string()).unwrap();
    let foreign = s.dir.join(".amend-tmp-user");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let out = s.p("out");
    let r = amend(&strs(&s.project(&["--out", &out])));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!dead.exists(), "the dead run's staging folder is removed");
    assert_eq!(std::fs::read(foreign.join("keep.txt")).unwrap(), b"mine");
}

/// Whether `out` is a complete edited model (loads, and holds every file its marker lists).
fn complete_model(out: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(out.join("amend_output.json")) else { return false };
    let marker: serde_json::Value = serde_json::from_str(&text).unwrap();
    marker["files"].as_array().unwrap().iter().all(|f| out.join(f.as_str().unwrap()).is_file())
        && amend::models::load(out, &Default::default()).is_ok()
}

/// Kills `cmd` with `signal` after `delay`; returns whether it had finished by itself.
fn kill_after(cmd: &[String], signal: &str, delay: std::time::Duration) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let child = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(cmd)
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let pid = child.id().to_string();
    let _ = Command::new("kill").args([signal, &pid]).status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => true,
        None => {
            let sig = out.status.signal().unwrap();
            assert!(sig == 15 || sig == 2, "killed by signal {sig}: {err}");
            false
        }
        Some(c) => panic!("{cmd:?} exited {c} after {signal}: {err}"),
    }
}

/// Every writing command, killed with SIGTERM or SIGINT at several moments, leaves either
/// nothing or a complete output (for edit: the model and the --metrics copy), never a staging
/// folder, and its inputs byte-identical.
#[test]
fn interrupted_commands_leave_nothing_or_a_complete_output() {
    use std::time::Duration;
    let s = Scratch::new();
    let before = s.inputs();
    let mut outcomes = (0, 0);
    let delays = [0u64, 40, 80, 120, 160, 200, 260, 330, 420, 600];
    for (n, ms) in delays.iter().enumerate() {
        let signal = if n % 2 == 0 { "-TERM" } else { "-INT" };
        for (kind, cmd) in [
            ("project", s.project(&["--out", &s.p("out"), "--metrics", &s.p("m.json")])),
            ("finetune", s.finetune(&["--out", &s.p("out"), "--metrics", &s.p("m.json")])),
        ] {
            let finished = kill_after(&cmd, signal, Duration::from_millis(*ms));
            let out = s.dir.join("out");
            let metrics = s.dir.join("m.json");
            if out.exists() || metrics.exists() {
                assert!(complete_model(&out), "{kind} {signal} at {ms} ms: incomplete --out");
                assert!(metrics.is_file(), "{kind} {signal} at {ms} ms: --out without --metrics");
                outcomes.1 += 1;
            } else {
                assert!(!finished, "{kind} finished but wrote nothing");
                outcomes.0 += 1;
            }
            assert_eq!(leftovers(&s.dir), Vec::<String>::new(), "{kind} {signal} at {ms} ms");
            assert_eq!(before, s.inputs(), "{kind} {signal} at {ms} ms: inputs changed");
            let _ = std::fs::remove_dir_all(&out);
            let _ = std::fs::remove_file(&metrics);
        }
    }
    // amend loss (a file output).
    {
        use tch::{Device, Kind, Tensor};
        let inputs = s.dir.join("batch.safetensors");
        let logits = Tensor::randn([4, 64, 512], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(512, [4, 64], (Kind::Int64, Device::Cpu));
        let weights = Tensor::ones([4, 64], (Kind::Int64, Device::Cpu));
        Tensor::write_safetensors(
            &[("logits", &logits), ("labels", &labels), ("weights", &weights)],
            &inputs,
        )
        .unwrap();
        let bytes = std::fs::read(&inputs).unwrap();
        let out = s.dir.join("loss.safetensors");
        for ms in [0u64, 30, 60, 100, 150] {
            let cmd: Vec<String> = [
                "loss",
                "nl",
                "--inputs",
                &s.p("batch.safetensors"),
                "--out",
                &s.p("loss.safetensors"),
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            kill_after(&cmd, "-TERM", Duration::from_millis(ms));
            if out.exists() {
                assert!(
                    Tensor::read_safetensors(&out).is_ok(),
                    "loss at {ms} ms: incomplete --out"
                );
                std::fs::remove_file(&out).unwrap();
            }
            assert_eq!(leftovers(&s.dir), Vec::<String>::new(), "loss at {ms} ms");
            assert_eq!(std::fs::read(&inputs).unwrap(), bytes);
        }
    }
    eprintln!("kills before the output / after it: {outcomes:?}");
    // The moments cover both outcomes (the runs take about a second).
    assert!(outcomes.0 > 0, "no kill landed before the output was written: {outcomes:?}");
}
