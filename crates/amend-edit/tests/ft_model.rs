//! Fine-tuning edits on the tiny GPT-2 fixture: step-for-step parity with torch
//! (`scripts/gen_edit_fixtures.py`), exact restores in single mode, the three modes, and bad
//! input.

use std::path::PathBuf;

use amend_edit::Error;
use amend_edit::ft::{
    Augmentation, EditMode, EditRow, FtOptions, FtRecipe, LocalityFacts, MaskMode, Objective,
    OptimizerConfig, ParamSelector, Paraphrases, RELEASED_PREFIXES, RowKind, TargetReduction,
    WeightSnapshot, ft_edit, ft_edit_dir, paraphrase_prefixes, train_rows,
};
use amend_edit::manifest::{MANIFEST_FILE, Manifest, OutputOptions};
use amend_edit::metrics::EvalConfig;
use amend_edit::{EditRequest, QaPair};
use amend_models::tokenizer::PaddingSide;
use amend_models::train::ScheduleKind;
use amend_models::{CausalLm, LoadOptions, Model, load};
use amend_testing::{Tol, load_json_fixture};
use serde_json::Value;
use tch::{Kind, Tensor};

fn gpt2_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../amend-models/tests/fixtures/models/gpt2")
}

fn gpt2() -> Model {
    tch::set_num_threads(1);
    load(gpt2_dir(), &LoadOptions::default()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn requests() -> Vec<EditRequest> {
    vec![
        EditRequest::new("The capital of France is", "Rome")
            .with_target_true("Paris")
            .with_rephrase(["France has its capital in"])
            .with_neighbourhood(["The capital of the French republic is"]),
        EditRequest {
            locality: [("facts".to_string(), vec![QaPair::new("The sky is", "blue")])].into(),
            ..EditRequest::new("{} plays the", "violin")
                .with_subject("Ana")
                .with_target_true("piano")
        },
    ]
}

/// Three optimizer steps of FT-M, FT-L with the norm box, and the Gangadhar & Stratos recipe
/// (all parameters, EOS, AdamW with weight decay) equal torch's, parameter by parameter.
#[test]
fn steps_match_torch() {
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "ft_steps.json");
    let rows: Vec<EditRow> = fx["rows"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| EditRow {
            prompt_ids: serde_json::from_value(r[0].clone()).unwrap(),
            target_ids: serde_json::from_value(r[1].clone()).unwrap(),
            kind: RowKind::Edit,
            request: i,
        })
        .collect();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut model = gpt2();
        let params: Vec<String> = serde_json::from_value(case["params"].clone()).unwrap();
        model.set_trainable(&|p| params.iter().any(|n| n == p.name())).unwrap();
        let recipe = FtRecipe {
            name: name.into(),
            objective: if case["objective"] == "prompt_last" {
                Objective::PromptLast
            } else {
                Objective::Conditional
            },
            reduction: if case["reduction"] == "token_mean" {
                TargetReduction::TokenMean
            } else {
                TargetReduction::ExampleMean
            },
            mask: MaskMode::Position,
            params: ParamSelector::Names { names: params.clone() },
            optimizer: OptimizerConfig {
                weight_decay: case["weight_decay"].as_f64().unwrap(),
                ..OptimizerConfig::default()
            },
            lr: case["lr"].as_f64().unwrap(),
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            epochs: case["steps"].as_u64().unwrap() as usize,
            batch_size: None,
            norm_box: case["norm_box"].as_f64(),
            skip_below: None,
            early_stop_avg: None,
            max_grad_norm: None,
            append_eos: case["eos"].is_number(),
            padding: if case["side"] == "left" { PaddingSide::Left } else { PaddingSide::Right },
            max_length: None,
            augmentation: Augmentation::none(),
            mode: EditMode::Batched,
            shuffle: false,
            seed: 0,
        };
        let log = train_rows(&mut model, &rows, &recipe, &params, None).unwrap();
        assert_eq!(log.steps, recipe.epochs, "{name}");
        let losses: Vec<f64> = serde_json::from_value(case["losses"].clone()).unwrap();
        Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close(
            &format!("{name} first loss"),
            &[log.first_loss],
            &losses[..1],
        );
        for (key, want) in case["expected"].as_object().unwrap() {
            let want: Vec<f64> = serde_json::from_value(want.clone()).unwrap();
            let got = flat(model.params().tensor(key).unwrap());
            Tol { rel: 1e-4, abs: 2e-6 }.assert_all_close(&format!("{name} {key}"), &got, &want);
        }
    }
}

/// FT-4: a single edit restores every parameter bit-exactly from a deep copy, and mutating a
/// live parameter in place does not reach the snapshot.
#[test]
fn single_edit_restores_bit_exactly() {
    let mut model = gpt2();
    let before = WeightSnapshot::capture(&model, None).unwrap();
    // The snapshot has its own storage.
    let name = "transformer.h.1.mlp.c_proj.weight";
    let live = model.params().tensor(name).unwrap().shallow_clone();
    let copy = before.tensors().iter().find(|(n, _)| n == name).unwrap().1.copy();
    tch::no_grad(|| {
        let mut l = live.shallow_clone();
        let _ = l.f_add_scalar_(1.0).unwrap();
    });
    let snap = &before.tensors().iter().find(|(n, _)| n == name).unwrap().1;
    assert!(snap.equal(&copy), "mutating the live parameter changed the snapshot");
    assert!(!snap.equal(&live));
    before.restore(&mut model).unwrap();
    assert!(model.params().tensor(name).unwrap().equal(snap));

    let recipe =
        FtRecipe::ft_m(ParamSelector::All).with_lr(1e-2).with_epochs(3).with_mode(EditMode::Single);
    let out = ft_edit(&mut model, &requests(), &recipe, &FtOptions::default()).unwrap();
    assert_eq!(out.report.restored_exactly, Some(true));
    assert_eq!(out.report.runs.len(), 2);
    assert!(out.report.runs.iter().all(|r| r.update_norm > 0.0), "each edit changed the weights");
    for (n, t) in before.tensors() {
        assert!(t.equal(model.params().tensor(n).unwrap()), "{n} not restored");
    }
    // Trainable flags are back to what they were (all trainable after load).
    assert!(model.params().iter().all(|p| p.trainable()));
    assert_eq!(out.records.len(), 2);
}

#[test]
fn batched_and_sequential_modes_edit_the_model() {
    let reqs = requests();
    for mode in [EditMode::Batched, EditMode::Sequential] {
        let mut model = gpt2();
        let before = WeightSnapshot::capture(&model, None).unwrap();
        let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] })
            .with_lr(2e-2)
            .with_epochs(15)
            .with_mode(mode);
        let out = ft_edit(&mut model, &reqs, &recipe, &FtOptions::default()).unwrap();
        let m = out.metrics.unwrap();
        // Efficacy (probability comparison) reaches 100 on the two edits.
        assert_eq!(m.memit_prob.post.efficacy.unwrap().mean, 100.0, "{mode:?}");
        assert!(
            m.easyedit_tokacc.post.rewrite_acc.unwrap()
                > m.easyedit_tokacc.pre.rewrite_acc.unwrap()
        );
        // Only the selected parameters changed.
        let changed: Vec<&str> = out
            .report
            .changed
            .iter()
            .filter(|c| c.frobenius_delta > 0.0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            changed,
            ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
        );
        for (n, t) in before.tensors() {
            if !changed.contains(&n.as_str()) {
                assert!(t.equal(model.params().tensor(n).unwrap()), "{n}");
            }
        }
        assert_eq!(out.report.runs.len(), if mode == EditMode::Batched { 1 } else { 2 });
        assert_eq!(out.report.data_counts.edits, 2);
        // Tagged families.
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["memit_prob"]["post"]["protocol"], "memit-prob");
        assert_eq!(j["easyedit_tokacc"]["post"]["protocol"], "easyedit-tokacc");
        assert_eq!(j["memit_tokacc"]["post"]["protocol"], "memit-tokacc");
        assert!(m.easyedit_tokacc.post.locality.contains_key("facts"));
        assert!(m.easyedit_tokacc.pre.locality.is_empty());
    }
}

#[test]
fn augmentation_rows_and_prefixes() {
    let model = gpt2();
    let released = paraphrase_prefixes(&model, &Paraphrases::Released { count: 10 }).unwrap();
    assert_eq!(released.len(), 10);
    assert_eq!(released[2], "The present invention relates. ");
    assert_eq!(RELEASED_PREFIXES.len(), 15);
    assert!(RELEASED_PREFIXES.iter().all(|p| p.ends_with(". ")));
    let g = Augmentation::generated(7, 3, LocalityFacts::None);
    let a = paraphrase_prefixes(&model, &g.paraphrases).unwrap();
    let b = paraphrase_prefixes(&model, &g.paraphrases).unwrap();
    assert_eq!(a.len(), 7);
    assert_eq!(a, b, "seeded");
    assert!(a.iter().all(|p| p.ends_with(". ")));

    let mut model = gpt2();
    let pool = vec![QaPair::new("The sky is", "blue and very wide today indeed"); 3];
    let aug = Augmentation {
        paraphrases: Paraphrases::Released { count: 4 },
        locality: LocalityFacts::Random { per_edit: 2 },
        locality_words: 2,
    };
    let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![0] })
        .with_epochs(1)
        .with_mode(EditMode::Batched)
        .with_augmentation(aug);
    let opts = FtOptions { locality_pool: pool, eval: None, progress: false };
    let out = ft_edit(&mut model, &requests(), &recipe, &opts).unwrap();
    let d = out.report.data_counts;
    assert_eq!((d.edits, d.paraphrases, d.locality), (2, 8, 4));
    assert!(out.metrics.is_none());
    // Random locality facts need a pool.
    let e = ft_edit(
        &mut model,
        &requests(),
        &recipe,
        &FtOptions { eval: None, ..FtOptions::default() },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
}

#[test]
fn bad_edit_requests_are_typed_errors() {
    let mut model = gpt2();
    let before = WeightSnapshot::capture(&model, None).unwrap();
    let recipe =
        FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] }).with_mode(EditMode::Batched);
    let opts = FtOptions::default();
    let mut reqs = requests();
    reqs[1].target_new = "   ".into();
    let e = ft_edit(&mut model, &reqs, &recipe, &opts).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidEdit { index: 1, field, .. } if field == "target_new"),
        "{e}"
    );
    let mut reqs = requests();
    reqs[0].target_true = Some("Rome".into());
    assert!(matches!(
        ft_edit(&mut model, &reqs, &recipe, &opts),
        Err(Error::InvalidEdit { index: 0, .. })
    ));
    let mut reqs = requests();
    reqs[0].rephrase.push(String::new());
    let e = ft_edit(&mut model, &reqs, &recipe, &opts).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidEdit { index: 0, field, .. } if field == "rephrase[1]"),
        "{e}"
    );
    let mut reqs = requests();
    reqs[1].target_true = None; // neighbourhood-free request: fine
    reqs[0].target_true = None; // has neighbourhood prompts: needs target_true
    assert!(matches!(
        ft_edit(&mut model, &reqs, &recipe, &opts),
        Err(Error::InvalidEdit { index: 0, .. })
    ));
    assert!(matches!(ft_edit(&mut model, &[], &recipe, &opts), Err(Error::InvalidInput { .. })));
    // Layer out of range; a selector matching nothing.
    let r = recipe.clone().with_params(ParamSelector::MlpOutput { layers: vec![2] });
    let e = ft_edit(&mut model, &requests(), &r, &opts).unwrap_err();
    assert!(matches!(&e, Error::LayerOutOfRange { layer: 2, num_layers: 2, .. }), "{e}");
    let r = recipe.clone().with_params(ParamSelector::MlpOutput { layers: (1..9).collect() });
    let e = ft_edit(&mut model, &requests(), &r, &opts).unwrap_err();
    // The message names the layer that is missing and the request as given, not a made-up range.
    assert!(e.to_string().contains("layer 2 does not exist"), "{e}");
    assert!(e.to_string().contains("requested layers: 1..9"), "{e}");
    let r = recipe.clone().with_params(ParamSelector::Modules {
        template: "mlp.down_proj.{}".into(),
        layers: vec![0],
    });
    assert!(matches!(
        ft_edit(&mut model, &requests(), &r, &opts),
        Err(Error::NoTrainableParams { .. })
    ));
    let r = recipe.clone().with_lr(f64::NAN);
    assert!(matches!(ft_edit(&mut model, &requests(), &r, &opts), Err(Error::InvalidInput { .. })));
    for (n, t) in before.tensors() {
        assert!(t.equal(model.params().tensor(n).unwrap()), "{n}");
    }
}

#[test]
fn directory_output_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ftm");
    let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] })
        .with_lr(1e-2)
        .with_epochs(2)
        .with_mode(EditMode::Batched);
    let opts = FtOptions { eval: Some(EvalConfig::default()), ..FtOptions::default() };
    let (outcome, dir) =
        ft_edit_dir(&gpt2_dir(), &requests(), &recipe, &opts, &out, &OutputOptions::default())
            .unwrap();
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(m.method, "finetune");
    assert_eq!(m.edited_keys.len(), 2);
    let ids: Vec<&str> = m.deliberate_differences.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["DF1", "DF2", "DF3", "DF4"]);
    assert_eq!(m.report["data_counts"]["edits"], 2);
    assert_eq!(m.config["mode"], "batched");
    let reloaded = load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(reloaded.num_layers(), 2);
    assert!(outcome.metrics.is_some());
    let single = recipe.with_mode(EditMode::Single);
    assert!(matches!(
        ft_edit_dir(
            &gpt2_dir(),
            &requests(),
            &single,
            &opts,
            &tmp.path().join("x"),
            &OutputOptions::default()
        ),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn bf16_model_is_updated_through_f32_masters() {
    tch::set_num_threads(1);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../amend-models/tests/fixtures/models/gpt2_bf16");
    let mut model = load(&dir, &LoadOptions::default().with_kind(Kind::BFloat16)).unwrap();
    let name = "transformer.h.1.mlp.c_proj.weight";
    let before = model.params().tensor(name).unwrap().copy();
    let recipe = FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] })
        .with_lr(1e-4)
        .with_epochs(5)
        .with_mode(EditMode::Batched);
    let out = ft_edit(
        &mut model,
        &requests(),
        &recipe,
        &FtOptions { eval: None, ..FtOptions::default() },
    )
    .unwrap();
    let after = model.params().tensor(name).unwrap();
    assert_eq!(after.kind(), Kind::BFloat16);
    assert!(!after.equal(&before));
    assert!(out.report.runs[0].update_norm > 0.0);
}

#[test]
fn same_answer_locality_facts_come_first() {
    use amend_edit::ft::training_rows;
    use rand::SeedableRng;
    let model = gpt2();
    let pool = vec![
        QaPair::new("The sky is", "blue"),
        QaPair::new("The capital of Gaul is", "Paris"),
        QaPair::new("Grass is", "green"),
        QaPair::new("Lutetia is now called", "Paris"),
        QaPair::new("Snow is", "white"),
    ];
    let aug = Augmentation {
        paraphrases: Paraphrases::None,
        locality: LocalityFacts::SameAnswer { per_edit: 3 },
        locality_words: 35,
    };
    let recipe = FtRecipe::ft_m(ParamSelector::All).with_augmentation(aug);
    let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(0);
    let rows = training_rows(&model, &requests(), &[0], &recipe, &[], &pool, &mut rng).unwrap();
    let tok = model.tokenizer().unwrap();
    let paris = tok.encode(" Paris", false).unwrap();
    let loc: Vec<&EditRow> = rows.iter().filter(|r| r.kind == RowKind::Locality).collect();
    assert_eq!(loc.len(), 3);
    assert_eq!(loc[0].target_ids, paris);
    assert_eq!(loc[1].target_ids, paris);
    assert_ne!(loc[2].target_ids, paris);
}
