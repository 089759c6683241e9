//! `amend loss`: inputs written here as safetensors, the binary run as a user would, outputs
//! checked against the library calls; bad input fails with a clear message and a non-zero exit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use amend::losses::Reduction;
use amend::losses::sequence::{
    CandidateSet, CpConfig, CpGroups, CpoConfig, DpoConfig, DpoLossType, NeatConfig, RrhfConfig,
    SeqLogps, contrastive_perplexity_loss, cpo_loss, dpo_loss, dpo_loss_weighted, neat_loss,
    rrhf_loss,
};
use amend::losses::token::{
    NllConfig, RefKlConfig, TntConfig, TntVariant, TokenWeights, nll_loss, reference_kl_loss,
    tnt_loss,
};
use tch::{Device, Kind, Tensor};

/// A scratch folder for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("amend-cli-loss-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn amend(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .args(["--threads", "1"].iter().filter(|_| !args.contains(&"--list")))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn write(path: &Path, tensors: &[(&str, &Tensor)]) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn vals(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

#[track_caller]
fn same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    for (i, (x, y)) in vals(a).iter().zip(vals(b)).enumerate() {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

#[track_caller]
fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn token_batch() -> (Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let logits = Tensor::randn([2, 5, 11], opts) * 2.0;
    let ref_logits = Tensor::randn([2, 5, 11], opts) * 2.0;
    let labels = Tensor::randint(11, [2, 5], (Kind::Int64, Device::Cpu));
    let weights = Tensor::from_slice(&[1i64, -1, 0, 1, 1, -1, 1, 1, 0, 1]).reshape([2, 5]);
    (logits, ref_logits, labels, weights)
}

#[test]
fn tnff_outputs_match_the_library() {
    let dir = Scratch::new("tnff");
    let (logits, ref_logits, labels, weights) = token_batch();
    let inputs = dir.path("batch.safetensors");
    write(
        &inputs,
        &[
            ("logits", &logits),
            ("ref_logits", &ref_logits),
            ("labels", &labels),
            ("weights", &weights),
        ],
    );
    let cfg = dir.path("cfg.json");
    std::fs::write(&cfg, r#"{"alpha": 2.0, "reduction": "mean"}"#).unwrap();
    let out = dir.path("out.safetensors");
    let summary = ok(&amend(&[
        "loss",
        "tnff",
        "--config",
        cfg.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = read(&out);
    // The library call with the same config.
    let z = logits.copy().set_requires_grad(true);
    let c = TntConfig::new(TntVariant::Ff).with_alpha(2.0).with_reduction(Reduction::Mean);
    let lib =
        tnt_loss(&z, &ref_logits, &labels, &TokenWeights::new(&weights).unwrap(), &c).unwrap();
    lib.loss.backward();
    same("loss", &got["loss"], &lib.loss.detach());
    same("per_example", &got["per_example"], &lib.per_example.detach());
    same("grad.logits", &got["grad.logits"], &z.grad());
    assert_eq!(vals(&got["part.tokens.count"]), vec![8.0]);
    let neg_mass = lib.metrics.get("tnt/neg_mass").unwrap();
    assert_eq!(vals(&got["metric.tnt/neg_mass.count"]), vec![neg_mass.count]);
    assert!((vals(&got["metric.tnt/neg_mass.sum"])[0] - neg_mass.sum).abs() < 1e-9);
    assert!((summary["loss"].as_f64().unwrap() - f64::try_from(&lib.loss).unwrap()).abs() < 1e-6);
    assert_eq!(summary["parts"]["tokens"]["count"].as_f64(), Some(8.0));
    // No temporary file is left behind.
    let names: Vec<_> =
        std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn nll_reference_kl_and_dpo_match_the_library() {
    let dir = Scratch::new("more");
    let (logits, ref_logits, labels, weights) = token_batch();
    let mask = weights.ne(0);
    // NLL with a mask and the default config (no --config), f64 logits.
    let z64 = logits.to_kind(Kind::Double);
    let inputs = dir.path("nll.safetensors");
    write(&inputs, &[("logits", &z64), ("labels", &labels), ("mask", &mask)]);
    let out = dir.path("nll_out.safetensors");
    ok(&amend(&[
        "loss",
        "nll",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = read(&out);
    let z = z64.copy().set_requires_grad(true);
    let lib = nll_loss(&z, &labels, Some(&mask), &NllConfig::default()).unwrap();
    lib.loss.backward();
    assert_eq!(got["grad.logits"].kind(), Kind::Double);
    same("nll loss", &got["loss"], &lib.loss.detach());
    same("nll grad", &got["grad.logits"], &z.grad());
    // Reverse KL with an exclude id per position and per-token outputs.
    let exclude = Tensor::from_slice(&[1i64, -1, 2, -1, 0, 3, -1, 4, 5, -1]).reshape([2, 5]);
    let inputs = dir.path("kl.safetensors");
    write(&inputs, &[("logits", &logits), ("ref_logits", &ref_logits), ("exclude", &exclude)]);
    let cfg = dir.path("kl.json");
    std::fs::write(
        &cfg,
        r#"{"direction": "reverse", "smoothing_eps": 0.001, "reduction": "none"}"#,
    )
    .unwrap();
    let out = dir.path("kl_out.safetensors");
    let args = ["loss", "reference_kl", "--config", cfg.to_str().unwrap(), "--inputs"];
    ok(&amend(&[&args[..], &[inputs.to_str().unwrap(), "--out", out.to_str().unwrap()]].concat()));
    let got = read(&out);
    let z = logits.copy().set_requires_grad(true);
    let c: RefKlConfig = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let lib = reference_kl_loss(&z, &ref_logits, Some(&exclude), None, &c).unwrap();
    lib.loss.sum(Kind::Float).backward();
    same("kl tokens", &got["loss"], &lib.loss.detach());
    same("kl grad", &got["grad.logits"], &z.grad());
    // DPO from per-sequence sums: gradients with respect to the policy sums.
    let chosen = Tensor::from_slice(&[-10.0f64, -7.5, -3.0]);
    let rejected = Tensor::from_slice(&[-11.0f64, -6.0, -4.5]);
    let ref_c = Tensor::from_slice(&[-10.5f64, -7.0, -3.5]);
    let ref_r = Tensor::from_slice(&[-10.0f64, -6.5, -4.0]);
    let inputs = dir.path("dpo.safetensors");
    write(
        &inputs,
        &[
            ("chosen_logps", &chosen),
            ("rejected_logps", &rejected),
            ("ref_chosen_logps", &ref_c),
            ("ref_rejected_logps", &ref_r),
        ],
    );
    let out = dir.path("dpo_out.safetensors");
    ok(&amend(&[
        "loss",
        "dpo",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = read(&out);
    let (c, r) = (chosen.copy().set_requires_grad(true), rejected.copy().set_requires_grad(true));
    let ones = Tensor::ones([3], (Kind::Int64, Device::Cpu));
    let lib = dpo_loss(
        &SeqLogps::from_sums(&c, &ones).unwrap(),
        &SeqLogps::from_sums(&r, &ones).unwrap(),
        &ref_c,
        &ref_r,
        &DpoConfig::default(),
    )
    .unwrap();
    lib.loss.backward();
    same("dpo loss", &got["loss"], &lib.loss.detach());
    same("dpo per-example", &got["per_example"], &lib.per_example.detach());
    same("dpo grad chosen", &got["grad.chosen_logps"], &c.grad());
    same("dpo grad rejected", &got["grad.rejected_logps"], &r.grad());
    assert!(got.contains_key("metric.rewards/margins.sum"));
}

/// The unlearning losses (CE-U, UNDIAL, WGA, SatImp, RMU) through `amend loss`, against the
/// library calls with the same configs.
#[test]
fn unlearning_losses_match_the_library() {
    use amend::losses::sequence::{RmuConfig, rmu_loss};
    use amend::losses::token::{
        CeuConfig, SatImpConfig, UndialConfig, WgaConfig, ceu_loss, satimp_loss, undial_loss,
        wga_loss,
    };
    let dir = Scratch::new("unlearning");
    let (logits, ref_logits, labels, _) = token_batch();
    let mask = Tensor::from_slice(&[false, true, true, true, true, true, true, false, true, true])
        .reshape([2, 5]);
    let inputs = dir.path("batch.safetensors");
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("mask", &mask)]);
    let with_ref = dir.path("batch_ref.safetensors");
    write(
        &with_ref,
        &[("logits", &logits), ("ref_logits", &ref_logits), ("labels", &labels), ("mask", &mask)],
    );
    let cfg_path = dir.path("cfg.json");
    let run = |name: &str, cfg: &str, inputs: &Path| {
        std::fs::write(&cfg_path, cfg).unwrap();
        let out = dir.path(&format!("{name}.safetensors"));
        ok(&amend(&[
            "loss",
            name,
            "--config",
            cfg_path.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        read(&out)
    };
    let check =
        |what: &str, got: &BTreeMap<String, Tensor>, out: amend::losses::LossOutput, z: &Tensor| {
            out.loss.backward();
            same(&format!("{what} loss"), &got["loss"], &out.loss.detach());
            same(&format!("{what} grad"), &got["grad.logits"], &z.grad());
        };
    let z = logits.copy().set_requires_grad(true);
    let got = run("ceu", r#"{"ignore_first_n_answer_tokens": 0}"#, &inputs);
    let c = CeuConfig::default().with_ignore_first_n_answer_tokens(0);
    check("ceu", &got, ceu_loss(&z, &labels, Some(&mask), &c).unwrap(), &z);
    let z = logits.copy().set_requires_grad(true);
    let got = run("undial", r#"{"beta": 3.0}"#, &with_ref);
    let c = UndialConfig::default().with_beta(3.0);
    check("undial", &got, undial_loss(&z, &ref_logits, &labels, Some(&mask), &c).unwrap(), &z);
    let z = logits.copy().set_requires_grad(true);
    let got = run("wga", r#"{"beta": 0.5}"#, &inputs);
    check(
        "wga",
        &got,
        wga_loss(&z, &labels, Some(&mask), &WgaConfig::default().with_beta(0.5)).unwrap(),
        &z,
    );
    let z = logits.copy().set_requires_grad(true);
    let got = run("satimp", r#"{"beta1": 2.0, "beta2": 0.5}"#, &inputs);
    let c = SatImpConfig::default().with_beta1(2.0).with_beta2(0.5);
    check("satimp", &got, satimp_loss(&z, &labels, Some(&mask), &c).unwrap(), &z);

    // RMU with a retain batch; open-unlearning's names `gamma` / `alpha`.
    tch::manual_seed(4);
    let opts = (Kind::Float, Device::Cpu);
    let (hf, hr, hr_ref) = (
        Tensor::randn([2, 3, 4], opts),
        Tensor::randn([1, 3, 4], opts),
        Tensor::randn([1, 3, 4], opts),
    );
    let (mf, mr) = (
        Tensor::ones([2, 3], (Kind::Bool, Device::Cpu)),
        Tensor::ones([1, 3], (Kind::Bool, Device::Cpu)),
    );
    let control = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.5]);
    let rmu_in = dir.path("rmu_in.safetensors");
    write(
        &rmu_in,
        &[
            ("forget_hidden", &hf),
            ("forget_mask", &mf),
            ("control", &control),
            ("retain_hidden", &hr),
            ("retain_ref_hidden", &hr_ref),
            ("retain_mask", &mr),
        ],
    );
    let got = run("rmu", r#"{"gamma": 0.5, "alpha": 2.0}"#, &rmu_in);
    let (a, b) = (hf.copy().set_requires_grad(true), hr.copy().set_requires_grad(true));
    let cfg = RmuConfig::default().with_forget_weight(0.5).with_retain_weight(2.0);
    let lib = rmu_loss(&a, &mf, &control, Some((&b, &hr_ref, &mr)), &cfg).unwrap();
    lib.loss.backward();
    same("rmu loss", &got["loss"], &lib.loss.detach());
    same("rmu grad forget", &got["grad.forget_hidden"], &a.grad());
    same("rmu grad retain", &got["grad.retain_hidden"], &b.grad());
}

/// A TRL mixture config (`loss_type` list + `loss_weights`) with WPO-style pair weights, and CPO.
#[test]
fn dpo_mixture_with_pair_weights_and_cpo_match_the_library() {
    let dir = Scratch::new("dpo-mix");
    let chosen = Tensor::from_slice(&[-10.0f64, -7.5, -3.0]);
    let rejected = Tensor::from_slice(&[-11.0f64, -6.0, -4.5]);
    let lens_c = Tensor::from_slice(&[4i64, 3, 2]);
    let lens_r = Tensor::from_slice(&[5i64, 3, 1]);
    let ref_c = Tensor::from_slice(&[-10.5f64, -7.0, -3.5]);
    let ref_r = Tensor::from_slice(&[-10.0f64, -6.5, -4.0]);
    let w = Tensor::from_slice(&[0.5f64, 1.0, 0.25]);
    let inputs = dir.path("in.safetensors");
    write(
        &inputs,
        &[
            ("chosen_logps", &chosen),
            ("rejected_logps", &rejected),
            ("chosen_lens", &lens_c),
            ("rejected_lens", &lens_r),
            ("ref_chosen_logps", &ref_c),
            ("ref_rejected_logps", &ref_r),
            ("pair_weights", &w),
        ],
    );
    let cfg_path = dir.path("cfg.json");
    let cfg_json = r#"{"beta": 0.3, "loss_type": ["sigmoid", "sft", "sigmoid_norm"],
                       "loss_weights": [1.0, 0.5, 0.2], "f_divergence_type": "js_divergence"}"#;
    std::fs::write(&cfg_path, cfg_json).unwrap();
    let out = dir.path("out.safetensors");
    let summary = ok(&amend(&[
        "loss",
        "dpo",
        "--config",
        cfg_path.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = read(&out);
    let (c, r) = (chosen.copy().set_requires_grad(true), rejected.copy().set_requires_grad(true));
    let cfg: DpoConfig = serde_json::from_str(cfg_json).unwrap();
    assert_eq!(cfg.terms()[1], (DpoLossType::Sft, 0.5));
    let lib = dpo_loss_weighted(
        &SeqLogps::from_sums(&c, &lens_c).unwrap(),
        &SeqLogps::from_sums(&r, &lens_r).unwrap(),
        &ref_c,
        &ref_r,
        &w,
        &cfg,
    )
    .unwrap();
    lib.loss.backward();
    same("mix loss", &got["loss"], &lib.loss.detach());
    same("mix grad chosen", &got["grad.chosen_logps"], &c.grad());
    same("mix grad rejected", &got["grad.rejected_logps"], &r.grad());
    for part in ["sigmoid", "sft", "sigmoid_norm"] {
        assert!(got.contains_key(&format!("part.{part}.sum")), "part {part} in {summary}");
    }

    let out = dir.path("cpo.safetensors");
    let cpo_in = dir.path("cpo_in.safetensors");
    write(
        &cpo_in,
        &[
            ("chosen_logps", &chosen),
            ("rejected_logps", &rejected),
            ("chosen_lens", &lens_c),
            ("rejected_lens", &lens_r),
        ],
    );
    ok(&amend(&[
        "loss",
        "cpo",
        "--inputs",
        cpo_in.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let got = read(&out);
    let (c, r) = (chosen.copy().set_requires_grad(true), rejected.copy().set_requires_grad(true));
    let lib = cpo_loss(
        &SeqLogps::from_sums(&c, &lens_c).unwrap(),
        &SeqLogps::from_sums(&r, &lens_r).unwrap(),
        &CpoConfig::default(),
    )
    .unwrap();
    lib.loss.backward();
    same("cpo loss", &got["loss"], &lib.loss.detach());
    same("cpo grad chosen", &got["grad.chosen_logps"], &c.grad());
    same("cpo grad rejected", &got["grad.rejected_logps"], &r.grad());
    assert!(got.contains_key("part.tokens.sum"), "the NLL part");

    // A config TRL would refuse is refused in words.
    std::fs::write(&cfg_path, r#"{"loss_type": ["nca_pair"], "f_divergence_type": "forward_kl"}"#)
        .unwrap();
    let bad = amend(&[
        "loss",
        "dpo",
        "--config",
        cfg_path.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("nca_pair") && err.contains("f_divergence_type"), "{err}");
}

#[test]
fn list_names_every_loss_and_its_inputs() {
    let out = amend(&["loss", "--list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "tnt",
        "tnff",
        "nl",
        "ul_annotated",
        "welleck_ul",
        "sequence_ul",
        "nll",
        "conditional_nll",
        "reference_kl",
        "seq_logps",
        "dpo",
        "cpo",
        "simpo",
        "orpo",
        "trl_sigmoid",
        "pair_weights",
        "ceu",
        "undial",
        "wga",
        "satimp",
        "rmu",
        "forget_hidden",
        "kto",
        "npo",
        "simnpo",
        "gradient_ascent",
        "contrastive_perplexity",
        "rrhf",
        "neat",
        "ref_logits",
        "prompt_mask",
        "chosen_logps",
        "phi_pos",
        "origin",
    ] {
        assert!(text.contains(name), "--list does not mention {name}:\n{text}");
    }
    // Each loss says what it is called in its paper and in TRL / Liger / open-unlearning.
    let blocks = text.split("\n\n").filter(|b| b.contains("; config ")).count();
    assert_eq!(text.matches("    known as: ").count(), blocks, "{text}");
    for name in ["TRL DPOTrainer", "LigerFusedLinearSimPOLoss", "open-unlearning NPO", "2304.05302"]
    {
        assert!(text.contains(name), "--list does not mention {name}:\n{text}");
    }
}

#[test]
fn group_losses_match_the_library() {
    let dir = Scratch::new("groups");
    // Contrastive perplexity: two anchors, a missing positive, random negatives.
    let pos = Tensor::from_slice(&[2.0f64, 1.5, 1.0, 9.0]).view([2, 2]);
    let mask_pos = Tensor::from_slice(&[1i64, 1, 1, 0]).view([2, 2]);
    let neg = Tensor::from_slice(&[3.0f64, 4.0 / 3.0, 0.5, 2.5]).view([2, 2]);
    let rnd = Tensor::from_slice(&[5.0f64, 0.25]).view([2, 1]);
    let inputs = dir.path("cp.safetensors");
    write(
        &inputs,
        &[("phi_pos", &pos), ("mask_pos", &mask_pos), ("phi_neg", &neg), ("phi_rnd", &rnd)],
    );
    let cfg = dir.path("cp.json");
    std::fs::write(&cfg, r#"{"tau": 0.5, "alpha": 2.0}"#).unwrap();
    let out = dir.path("cp_out.safetensors");
    let (i, o, c) = (inputs.to_str().unwrap(), out.to_str().unwrap(), cfg.to_str().unwrap());
    ok(&amend(&["loss", "cp", "--config", c, "--inputs", i, "--out", o]));
    let got = read(&out);
    let leaves: Vec<Tensor> =
        [&pos, &neg, &rnd].iter().map(|t| t.copy().set_requires_grad(true)).collect();
    let groups = CpGroups {
        phi_pos: &leaves[0],
        mask_pos: Some(&mask_pos),
        phi_neg: &leaves[1],
        mask_neg: None,
        phi_rnd: Some(&leaves[2]),
        mask_rnd: None,
    };
    let cp_cfg: CpConfig = serde_json::from_str(r#"{"tau": 0.5, "alpha": 2.0}"#).unwrap();
    let lib = contrastive_perplexity_loss(&groups, &cp_cfg).unwrap();
    lib.loss.backward();
    same("cp loss", &got["loss"], &lib.loss.detach());
    same("cp per-anchor", &got["per_example"], &lib.per_example.detach());
    for (name, leaf) in ["phi_pos", "phi_neg", "phi_rnd"].iter().zip(&leaves) {
        same(&format!("cp grad {name}"), &got[&format!("grad.{name}")], &leaf.grad());
    }
    // The missing positive gets no gradient.
    assert_eq!(vals(&got["grad.phi_pos"])[3], 0.0);

    // RRHF and NEAT on one group of six candidates (NEAT's worked example) and a ragged group.
    let logps = Tensor::from_slice(&[
        -3.5f64, -0.6, -0.8, -2.0, -0.5, -2.1, -1.0, -4.0, -2.0, 0.0, 0.0, 0.0,
    ])
    .view([2, 6]);
    let lens = Tensor::from_slice(&[3i64, 2, 4, 2, 2, 3, 1, 2, 2, 1, 1, 1]).view([2, 6]);
    let rewards =
        Tensor::from_slice(&[0.5f64, 2.0, 1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0])
            .view([2, 6]);
    let mask = Tensor::from_slice(&[1u8, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]).view([2, 6]);
    let origin = Tensor::from_slice(&[0i64, 0, 1, 1, 2, 2, 0, 0, 1, 0, 0, 0]).view([2, 6]);
    for name in ["rrhf", "neat"] {
        let inputs = dir.path(&format!("{name}.safetensors"));
        let mut tensors =
            vec![("logps", &logps), ("lens", &lens), ("rewards", &rewards), ("mask", &mask)];
        if name == "neat" {
            tensors.push(("origin", &origin));
        }
        write(&inputs, &tensors);
        let out = dir.path(&format!("{name}_out.safetensors"));
        ok(&amend(&[
            "loss",
            name,
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        let got = read(&out);
        let leaf = logps.copy().set_requires_grad(true);
        let cands = CandidateSet::new(&leaf, &lens, &rewards).unwrap().with_mask(&mask).unwrap();
        let lib = if name == "rrhf" {
            rrhf_loss(&cands, &RrhfConfig::default()).unwrap()
        } else {
            neat_loss(&cands.with_origin(&origin).unwrap(), &NeatConfig::default()).unwrap()
        };
        lib.loss.backward();
        same(&format!("{name} loss"), &got["loss"], &lib.loss.detach());
        same(&format!("{name} per-group"), &got["per_example"], &lib.per_example.detach());
        same(&format!("{name} grad"), &got["grad.logps"], &leaf.grad());
        // The padding slots get no gradient.
        assert!(vals(&got["grad.logps"])[9..].iter().all(|&g| g == 0.0), "{name}");
    }
    // NEAT without origins is RRHF (spec): the two commands agree.
    let inputs = dir.path("plain.safetensors");
    write(&inputs, &[("logps", &logps), ("lens", &lens), ("rewards", &rewards), ("mask", &mask)]);
    let (a, b) = (dir.path("a.safetensors"), dir.path("b.safetensors"));
    let i = inputs.to_str().unwrap();
    ok(&amend(&["loss", "rrhf", "--inputs", i, "--out", a.to_str().unwrap()]));
    ok(&amend(&["loss", "neat", "--inputs", i, "--out", b.to_str().unwrap()]));
    same("neat = rrhf without origins", &read(&b)["loss"], &read(&a)["loss"]);
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let dir = Scratch::new("bad");
    let (logits, ref_logits, labels, weights) = token_batch();
    let inputs = dir.path("batch.safetensors");
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("weights", &weights)]);
    let out = dir.path("out.safetensors");
    let (i, o) = (inputs.to_str().unwrap(), out.to_str().unwrap());
    let fails = |args: &[&str], needle: &str| {
        let r = amend(args);
        assert!(!r.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle), "{args:?}: `{needle}` not in:\n{err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    };
    // A missing tensor (TNT needs the reference logits).
    fails(&["loss", "tnt", "--inputs", i, "--out", o], "needs a tensor named `ref_logits`");
    // An unknown loss, an unknown tensor name, an unknown config field.
    fails(&["loss", "tnx", "--inputs", i, "--out", o], "unknown loss `tnx`");
    write(&inputs, &[("logits", &logits), ("label", &labels), ("weights", &weights)]);
    fails(&["loss", "nl", "--inputs", i, "--out", o], "does not read a tensor named `label`");
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("weights", &weights)]);
    let cfg = dir.path("cfg.json");
    std::fs::write(&cfg, r#"{"alpah": 1.0}"#).unwrap();
    let c = cfg.to_str().unwrap();
    fails(&["loss", "nl", "--config", c, "--inputs", i, "--out", o], "not a valid config");
    // A loss-level error: weights outside {-1, 0, 1}, labels out of range, shape mismatch.
    let bad_w = Tensor::from_slice(&[1i64, 5, 0, 1, 1, -1, 1, 1, 0, 1]).reshape([2, 5]);
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("weights", &bad_w)]);
    fails(&["loss", "nl", "--inputs", i, "--out", o], "token weights must be -1, 0 or +1");
    let bad_y = labels.full_like(99);
    write(&inputs, &[("logits", &logits), ("labels", &bad_y), ("weights", &weights)]);
    fails(&["loss", "nl", "--inputs", i, "--out", o], "outside");
    let short = ref_logits.narrow(1, 0, 4).contiguous();
    write(
        &inputs,
        &[("logits", &logits), ("ref_logits", &short), ("labels", &labels), ("weights", &weights)],
    );
    fails(&["loss", "tnrr", "--inputs", i, "--out", o], "ref_logits");
    // NaN logits at an active position: an error by default.
    let nan = logits.copy();
    let _ = nan.get(0).get(0).get(3).fill_(f64::NAN);
    write(&inputs, &[("logits", &nan), ("labels", &labels), ("weights", &weights)]);
    fails(&["loss", "nl", "--inputs", i, "--out", o], "holds NaN");
    // The output may not overwrite an input, and a missing input file is reported.
    fails(&["loss", "nl", "--inputs", i, "--out", i], "it is the input --inputs");
    let r = amend(&["loss", "nl", "--inputs", "/nonexistent/x.safetensors", "--out", o]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("/nonexistent/x.safetensors: No such file or directory"), "{err}");
    assert!(!err.contains("Os {") && !err.contains("IoError"), "a debug dump: {err}");
    // A mask value other than 0/1 is not taken as "true".
    let mask2 = Tensor::from_slice(&[1i64, 2, 0, 1, 1, 1, 1, 1, 0, 1]).reshape([2, 5]);
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("mask", &mask2)]);
    fails(&["loss", "nll", "--inputs", i, "--out", o], "mask");
    let r = amend(&["loss", "nll", "--inputs", i, "--out", o]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("must be 0 or 1 (or bool); 1 entries are not, the first is 2 at [0, 1]"),
        "{err}"
    );
    // A knob the compute dtype cannot hold: alpha = 1e300 is infinite in f32.
    write(
        &inputs,
        &[
            ("logits", &logits),
            ("ref_logits", &ref_logits),
            ("labels", &labels),
            ("weights", &weights),
        ],
    );
    std::fs::write(&cfg, r#"{"alpha": 1e300}"#).unwrap();
    fails(&["loss", "tnff", "--config", c, "--inputs", i, "--out", o], "alpha");
    assert!(inputs.exists(), "the input file survived");
}

#[test]
fn corrupt_inputs_file_is_described_in_words() {
    let dir = Scratch::new("corrupt");
    let (logits, _, labels, weights) = token_batch();
    let inputs = dir.path("batch.safetensors");
    write(&inputs, &[("logits", &logits), ("labels", &labels), ("weights", &weights)]);
    let bytes = std::fs::read(&inputs).unwrap();
    let out = dir.path("out.safetensors");
    let (i, o) = (inputs.to_str().unwrap(), out.to_str().unwrap());
    let fails = |needle: &str| {
        let r = amend(&["loss", "nl", "--inputs", i, "--out", o]);
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(needle), "`{needle}` not in:\n{err}");
        for bare in ["HeaderTooLarge", "HeaderTooSmall", "MetadataIncompleteBuffer"] {
            assert!(!err.contains(bare), "{err}");
        }
        assert!(!out.exists());
    };
    let mut big = bytes.clone();
    big[..8].copy_from_slice(&9_000_000_000_000_000_000u64.to_le_bytes());
    std::fs::write(&inputs, &big).unwrap();
    fails(&format!(
        "{i}: the header says it is 9000000000000000000 bytes long but the file has {} bytes: the \
         file is truncated or not a safetensors file",
        bytes.len()
    ));
    std::fs::write(&inputs, &bytes[..5]).unwrap();
    fails(&format!("{i}: the file has only 5 bytes"));
    std::fs::write(&inputs, &bytes[..bytes.len() - 3]).unwrap();
    fails(&format!("{i}: the file has {} bytes but its header describes", bytes.len() - 3));
}
