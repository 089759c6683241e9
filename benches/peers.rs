//! Peers side by side: one training step of amend's fused-linear losses against Liger-Kernel's
//! chunked losses and the PyTorch full-logits composite, on the same inputs, shapes and threads,
//! in one run (issue 14, item 3).
//!
//! ```text
//! make peers                                   # once: Liger-Kernel 0.8.5 (and TRL) into the venv
//! cargo bench --bench peers                    # N×H×V = 512×256×50257
//! AMEND_BENCH=large cargo bench --bench peers  # + 2048×768×50257
//! cargo bench --bench peers -- --test          # smoke: a tiny shape, Liger eager only
//! ```
//!
//! | loss | amend | Liger-Kernel 0.8.5 | PyTorch composite |
//! |---|---|---|---|
//! | `dpo` (sigmoid, β 0.1, reference hidden states and head, log-prob sums) | `seq_logps_fused_linear` ×2 (reference under no-grad) → `dpo_loss` → `f_attach` | `LigerFusedLinearDPOLoss(use_ref_model=True)` | `h·Wᵀ` → `log_softmax` → gather → loss |
//! | `orpo` (λ 0.1, token-mean NLL of the chosen responses) | … → `orpo_loss(ResponseOnly)` | `LigerFusedLinearORPOLoss` | the same |
//! | `simpo` (β 2, γ 0.5, no NLL) | … → `simpo_loss` | `LigerFusedLinearSimPOLoss(compute_nll_loss=False)` | the same |
//! | `ce` (token mean over all `N` rows) | `fused_linear_nll_loss` | `LigerFusedLinearCrossEntropyLoss` (Triton only: reported as not running on CPU) | `F.cross_entropy(h·Wᵀ)` |
//!
//! Liger runs with `compiled=True` (its default, torch.compile's CPU backend; `liger`) and
//! `compiled=False` (`liger-eager`), with its default `chunk_size`. amend runs its defaults (256
//! rows per chunk at `V = 50257`). The preference tiers hold `2P` sequences of `T` positions
//! (`P` chosen, then `P` rejected, as Liger lays them out), the first quarter of each a prompt;
//! `N = 2P·T` rows of hidden states `[2P, T, H]` and a head `[V, H]`, both requiring grad.
//!
//! The parent writes the inputs once per tier to a safetensors file every side reads. Each
//! measurement runs in a fresh child process: amend's in this binary (`AMEND_PEERS_CASE`), the
//! peers' in `scripts/bench_peers.py` under `AMEND_TORCH_PYTHON` (which `.cargo/config.toml`
//! sets). One step = fresh gradients, forward, `backward()`. Time: the median step after 2
//! warm-up steps over ~`AMEND_BENCH_SECONDS` (default 5, at least 3 steps). Memory: after one
//! warm-up step, `VmHWM − VmRSS` of one step with `MALLOC_MMAP_THRESHOLD_=131072` on every side
//! (so freed large buffers leave the RSS and the peak is the step's own). The losses of all sides
//! must agree within 1e-4 relative, or the bench fails. `AMEND_BENCH_THREADS` (default 1) sets
//! the intra-op threads of every side. Results: markdown tables and `target/bench-peers.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use amend_losses::sequence::{
    DpoConfig, FusedLinearConfig, NllScope, OrpoConfig, SimPoConfig, dpo_loss, orpo_loss,
    seq_logps_fused_linear, simpo_loss,
};
use amend_losses::token::{FusedLinearOptions, LinearHead, NllConfig, fused_linear_nll_loss};
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

#[path = "common/proc_status.rs"]
mod proc_status;

const ENV: &str = "AMEND_PEERS_CASE";
const LOSSES: [&str; 4] = ["dpo", "orpo", "simpo", "ce"];
/// glibc serves allocations above this from mmap and unmaps them on free.
const MMAP_THRESHOLD: &str = "131072";

struct Tier {
    pairs: i64,
    seq: i64,
    hidden: i64,
    vocab: i64,
}

impl Tier {
    fn label(&self) -> String {
        format!("{}×{}×{}", 2 * self.pairs * self.seq, self.hidden, self.vocab)
    }
}

fn tiers(smoke: bool) -> Vec<Tier> {
    if smoke {
        return vec![Tier { pairs: 2, seq: 16, hidden: 32, vocab: 1000 }];
    }
    let mut v = vec![Tier { pairs: 2, seq: 128, hidden: 256, vocab: 50257 }];
    if std::env::var("AMEND_BENCH").as_deref() == Ok("large") {
        v.push(Tier { pairs: 4, seq: 256, hidden: 768, vocab: 50257 });
    }
    v
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    match std::env::var(ENV) {
        Ok(case) => child(&case),
        Err(_) => parent(std::env::args().any(|a| a == "--test")),
    }
}

/// Writes one tier's inputs (seeded) and returns the file.
fn write_inputs(t: &Tier, dir: &Path) -> PathBuf {
    tch::manual_seed(7);
    let opts = (Kind::Float, Device::Cpu);
    let (b, s) = (2 * t.pairs, t.seq);
    let hidden = Tensor::randn([b, s, t.hidden], opts);
    let weight = Tensor::randn([t.vocab, t.hidden], opts) * (1.0 / (t.hidden as f64).sqrt());
    let ids = Tensor::randint(t.vocab, [b, s], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([b, s], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(1, 0, s / 4).fill_(0);
    let ref_hidden = &hidden + Tensor::randn([b, s, t.hidden], opts) * 0.1;
    let ref_weight = weight.copy();
    let path = dir.join(format!("peers-{}.safetensors", t.label()));
    Tensor::write_safetensors(
        &[
            ("hidden", &hidden),
            ("weight", &weight),
            ("ids", &ids),
            ("mask", &mask),
            ("ref_hidden", &ref_hidden),
            ("ref_weight", &ref_weight),
        ],
        &path,
    )
    .expect("write the bench inputs");
    path
}

/// Runs one measurement in a child and returns its JSON line.
fn run_child(mut cmd: Command, what: &str) -> Value {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{'));
    match line.and_then(|l| serde_json::from_str(l).ok()) {
        Some(v) if out.status.success() => v,
        _ => panic!(
            "{what} failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn measure(
    exe: &Path,
    python: Option<&str>,
    imp: &str,
    loss: &str,
    mode: &str,
    inputs: &Path,
    threads: usize,
    seconds: f64,
) -> Option<Value> {
    let mut cmd = if imp == "amend" {
        let mut c = Command::new(exe);
        let case = format!("{loss}:{mode}:{threads}:{seconds}:{}", inputs.display());
        c.env(ENV, case);
        c
    } else {
        let mut c = Command::new(python?);
        c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_peers.py"))
            .args(["--inputs", inputs.to_str().expect("utf-8 path")])
            .args(["--loss", loss, "--impl", imp, "--mode", mode])
            .args(["--threads", &threads.to_string(), "--seconds", &seconds.to_string()]);
        c
    };
    if mode == "mem" {
        cmd.env("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD);
    }
    Some(run_child(cmd, &format!("{imp} {loss} {mode}")))
}

fn liger_installed(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import liger_kernel.chunked_loss"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn parent(smoke: bool) {
    let threads: usize = env_num("AMEND_BENCH_THREADS", 1);
    let seconds: f64 = if smoke { 0.0 } else { env_num("AMEND_BENCH_SECONDS", 5.0) };
    let exe = std::env::current_exe().expect("the bench binary knows its path");
    let python = std::env::var("AMEND_TORCH_PYTHON").ok();
    let mut imps = vec!["amend"];
    match &python {
        None => println!("AMEND_TORCH_PYTHON is not set (run `make setup`): amend only"),
        Some(py) => {
            if liger_installed(py) {
                imps.extend(if smoke { &["liger-eager"][..] } else { &["liger", "liger-eager"] });
            } else {
                println!("Liger-Kernel is not installed in {py} (run `make peers`): skipping it");
            }
            imps.push("torch");
        }
    }
    let work = std::env::temp_dir().join(format!("amend-bench-peers-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("temp dir");
    println!(
        "threads {threads}, ~{seconds} s per timing, libtorch {}",
        amend::runtime::RuntimeInfo::detect().libtorch_version.unwrap_or_default()
    );
    let mut rows = vec![];
    for tier in tiers(smoke) {
        let inputs = write_inputs(&tier, &work);
        for loss in LOSSES {
            let mut reference: Option<f64> = None;
            for imp in &imps {
                let t0 = Instant::now();
                let time =
                    measure(&exe, python.as_deref(), imp, loss, "time", &inputs, threads, seconds);
                let mem = match &time {
                    Some(v) if v.get("error").is_none() => measure(
                        &exe,
                        python.as_deref(),
                        imp,
                        loss,
                        "mem",
                        &inputs,
                        threads,
                        seconds,
                    ),
                    _ => None,
                };
                let (time, mem) = (time.unwrap_or(Value::Null), mem.unwrap_or(Value::Null));
                let error = time["error"].as_str().map(str::to_string);
                for v in [&time, &mem] {
                    if let Some(l) = v["loss"].as_f64() {
                        let r = *reference.get_or_insert(l);
                        assert!(
                            (l - r).abs() <= 1e-4 * r.abs().max(1.0),
                            "{loss} at {}: {imp} gives loss {l}, amend {r}",
                            tier.label()
                        );
                    }
                }
                eprintln!("  {loss} {imp}: {:.1} s", t0.elapsed().as_secs_f64());
                rows.push(json!({
                    "shape": tier.label(), "loss": loss, "impl": imp, "threads": threads,
                    "median_ms": time["median_ms"], "iters": time["iters"],
                    "peak_step_mib": mem["peak_step_kib"].as_f64().map(|k| k / 1024.0),
                    "loss_value": time["loss"], "error": error,
                }));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    print_tables(&rows, &imps);
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-peers.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap_or_default());
}

fn print_tables(rows: &[Value], imps: &[&str]) {
    let find = |shape: &str, loss: &str, imp: &str| {
        rows.iter().find(|r| r["shape"] == shape && r["loss"] == loss && r["impl"] == imp)
    };
    let mut shapes: Vec<&str> = rows.iter().filter_map(|r| r["shape"].as_str()).collect();
    shapes.dedup();
    for (title, key, digits) in
        [("step time (ms, median)", "median_ms", 1), ("peak step memory (MiB)", "peak_step_mib", 1)]
    {
        println!("\n{title}; in parentheses: ÷ amend\n");
        println!("| loss | N×H×V | {} |", imps.join(" | "));
        println!("|---|---|{}", "---:|".repeat(imps.len()));
        for shape in &shapes {
            for loss in LOSSES {
                let base = find(shape, loss, "amend").and_then(|r| r[key].as_f64());
                let cells: Vec<String> = imps
                    .iter()
                    .map(|imp| match find(shape, loss, imp) {
                        Some(r) if r["error"].is_string() => "no CPU path".to_string(),
                        Some(r) => match (r[key].as_f64(), base) {
                            (Some(x), Some(b)) if *imp != "amend" => {
                                format!("{x:.digits$} ({:.2})", x / b)
                            }
                            (Some(x), _) => format!("{x:.digits$}"),
                            _ => "n/a".to_string(),
                        },
                        None => "n/a".to_string(),
                    })
                    .collect();
                println!("| {loss} | {shape} | {} |", cells.join(" | "));
            }
        }
    }
    for r in rows.iter().filter(|r| r["error"].is_string()) {
        println!("\n{} {}: {}", r["impl"].as_str().unwrap_or(""), r["loss"], r["error"]);
    }
}

/// The bench inputs, read back from the parent's file.
struct Inputs {
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    mask: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
}

fn read_inputs(path: &str) -> Inputs {
    let mut named = Tensor::read_safetensors(path).expect("read the bench inputs");
    let mut take = |name: &str| {
        let i = named.iter().position(|(n, _)| n == name).expect("tensor in the inputs file");
        named.swap_remove(i).1
    };
    Inputs {
        hidden: take("hidden"),
        weight: take("weight"),
        ids: take("ids"),
        mask: take("mask"),
        ref_hidden: take("ref_hidden"),
        ref_weight: take("ref_weight"),
    }
}

/// Drops the previous step's gradients, as `grad = None` does on the Python side: fresh leaves
/// over the same storage.
fn fresh_leaves(x: &mut Inputs) {
    x.hidden = x.hidden.detach().set_requires_grad(true);
    x.weight = x.weight.detach().set_requires_grad(true);
}

/// One step of amend's loss on fresh leaves: forward, `backward()`. Returns the loss.
fn amend_step(loss: &str, x: &Inputs) -> amend_losses::Result<f64> {
    let p = x.hidden.size()[0] / 2;
    let cfg = FusedLinearConfig::default();
    let out = if loss == "ce" {
        let h = x.hidden.f_view([-1, x.hidden.size()[2]])?;
        let labels = x.ids.f_view([-1])?;
        let opts = FusedLinearOptions::default();
        fused_linear_nll_loss(
            &h,
            LinearHead::new(&x.weight),
            &labels,
            None,
            &NllConfig::default(),
            &opts,
        )?
        .loss
    } else {
        let fl = seq_logps_fused_linear(&x.hidden, &x.weight, None, &x.ids, &x.mask, &cfg)?;
        let (c, r) = fl.logps().f_split_at(p)?;
        let out = match loss {
            "dpo" => {
                let refs = {
                    let _g = tch::no_grad_guard();
                    seq_logps_fused_linear(
                        &x.ref_hidden,
                        &x.ref_weight,
                        None,
                        &x.ids,
                        &x.mask,
                        &cfg,
                    )?
                    .into_logps()
                };
                let (rc, rr) = refs.f_split_at(p)?;
                dpo_loss(&c, &r, &rc.sum, &rr.sum, &DpoConfig::default())?
            }
            "orpo" => {
                let cfg = OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly);
                orpo_loss(&c, &r, None, &cfg)?
            }
            "simpo" => simpo_loss(&c, &r, &SimPoConfig::default())?,
            other => panic!("unknown loss {other}"),
        };
        fl.f_attach(&out.loss)?
    };
    out.f_backward()?;
    Ok(f64::try_from(&out)?)
}

/// Child: `loss:mode:threads:seconds:inputs`; prints one JSON line as the Python side does.
fn child(case: &str) {
    let mut p = case.splitn(5, ':');
    let mut next = || p.next().expect("AMEND_PEERS_CASE = loss:mode:threads:seconds:inputs");
    let (loss, mode) = (next().to_string(), next().to_string());
    let threads: i32 = next().parse().expect("threads");
    let seconds: f64 = next().parse().expect("seconds");
    let mut x = read_inputs(next());
    tch::set_num_threads(threads);
    let run = |x: &Inputs| amend_step(&loss, x).unwrap_or_else(|e| panic!("amend {loss}: {e}"));
    let step = |x: &mut Inputs| {
        fresh_leaves(x);
        run(x)
    };
    step(&mut x);
    if mode == "mem" {
        fresh_leaves(&mut x);
        let before = proc_status::reset_peak();
        let loss = run(&x);
        let peak = proc_status::status_kib("VmHWM:");
        let d = peak.saturating_sub(before);
        println!("{{\"peak_step_kib\":{d},\"rss_before_kib\":{before},\"loss\":{loss}}}");
        return;
    }
    step(&mut x);
    let mut times = vec![];
    let start = Instant::now();
    let mut last = 0.0;
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t0 = Instant::now();
        last = step(&mut x);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) };
    println!("{}", json!({"median_ms": median, "iters": n, "loss": last}));
}
