//! ProFS on real (tiny) models: parity with transformers (fixture from
//! `scripts/gen_edit_fixtures.py`), the edited-directory write, and bad input.

use std::path::PathBuf;

use amend_edit::Error;
use amend_edit::manifest::{MANIFEST_FILE, Manifest, OutputOptions};
use amend_edit::profs::{
    Pairing, Pooling, PreferencePair, ProfsConfig, pooled_embeddings, profs_edit, profs_edit_dir,
    sample_pair_indices,
};
use amend_models::config::{Gpt2Config, ModelConfig};
use amend_models::{CausalLm, Gpt2, LoadOptions, Model, load};
use amend_testing::{Tol, load_json_fixture};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../amend-models/tests/fixtures/models")
        .join(name)
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn vec2(v: &Value) -> Vec<f64> {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    rows.into_iter().flatten().collect()
}

fn pairs_of(fx: &Value) -> Vec<PreferencePair> {
    fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PreferencePair::new(p[0].as_str().unwrap(), p[1].as_str().unwrap()))
        .collect()
}

fn snapshot(m: &Model) -> Vec<(String, Tensor)> {
    m.params().snapshot().unwrap()
}

#[test]
fn gpt2_and_llama_match_transformers() {
    tch::set_num_threads(1);
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_models.json");
    for family in ["gpt2", "llama"] {
        let f = &fx[family];
        let layers: Vec<usize> = serde_json::from_value(f["layers"].clone()).unwrap();
        let k = f["k"].as_u64().unwrap() as usize;
        let mut model = load(fixture_dir(family), &LoadOptions::default()).unwrap();
        let before = snapshot(&model);
        // Pooled embeddings match transformers' block outputs (D6: pre-final-norm last block).
        let tok = model.tokenizer().unwrap();
        let seqs: Vec<Vec<u32>> =
            pairs_of(f).iter().map(|p| tok.encode(&p.preferred, true).unwrap()).collect();
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(f["token_ids_pos"].clone()).unwrap();
        assert_eq!(seqs, want_ids, "{family}: tokenisation");
        // batch 4 for 6 rows: the last batch is partial and still pooled (PF-2).
        let emb = pooled_embeddings(&model, &seqs, &layers, Pooling::MeanMasked, 4, None).unwrap();
        for (i, lo) in f["layers_out"].as_array().unwrap().iter().enumerate() {
            Tol { rel: 1e-4, abs: 1e-4 }.assert_all_close(
                &format!("{family} x_pos layer {}", lo["layer"]),
                &flat(&emb[i]),
                &vec2(&lo["x_pos"]),
            );
        }
        let cfg =
            ProfsConfig::default().with_layers(layers[0]..layers[layers.len() - 1] + 1).with_k(k);
        let report = profs_edit(&mut model, &pairs_of(f), &cfg).unwrap();
        assert_eq!(report.pairs_used, 6);
        assert_eq!(report.changed.len(), layers.len());
        for lo in f["layers_out"].as_array().unwrap() {
            let key = lo["key"].as_str().unwrap();
            let got = model.params().tensor(key).unwrap();
            Tol { rel: 1e-3, abs: 2e-4 }.assert_all_close(
                &format!("{family} {key}"),
                &flat(got),
                &vec2(&lo["edited"]),
            );
            let l = lo["layer"].as_u64().unwrap() as usize;
            let sigma: Vec<f64> = serde_json::from_value(lo["sigma"].clone()).unwrap();
            let s = report.layer_summaries.iter().find(|s| s.layer == l).unwrap();
            Tol { rel: 1e-3, abs: 1e-4 }.assert_all_close("sigma", &s.sigma_top_k, &sigma[..k]);
        }
        // Every other tensor is bit-identical.
        let edited: Vec<&str> = report.changed.iter().map(|c| c.name.as_str()).collect();
        for (name, t) in &before {
            if !edited.contains(&name.as_str()) {
                assert!(t.equal(model.params().tensor(name).unwrap()), "{family}: {name} changed");
            }
        }
    }
}

#[test]
fn deterministic_and_writes_a_loadable_directory_with_manifest() {
    tch::set_num_threads(1);
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_models.json");
    let pairs = pairs_of(&fx["gpt2"]);
    let dir = fixture_dir("gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ProfsConfig::default().with_layers(0..2).with_k(2);
    let out = tmp.path().join("edited");
    let (report, written) =
        profs_edit_dir(&dir, &pairs, &cfg, &out, &OutputOptions::default()).unwrap();
    assert_eq!(written, out);
    // Same edit in memory: identical weights (deterministic).
    let mut m = load(&dir, &LoadOptions::default()).unwrap();
    profs_edit(&mut m, &pairs, &cfg).unwrap();
    let reloaded = load(&out, &LoadOptions::default()).unwrap();
    for (name, t) in snapshot(&m) {
        assert!(t.equal(reloaded.params().tensor(&name).unwrap()), "{name}");
    }
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.method, "profs");
    assert_eq!(
        manifest.edited_keys,
        vec![
            "transformer.h.0.mlp.c_proj.weight".to_string(),
            "transformer.h.1.mlp.c_proj.weight".to_string()
        ]
    );
    assert_eq!(manifest.input_weights_sha256.len(), 1);
    assert!(manifest.input_weights_sha256["model.safetensors"].len() == 64);
    let ids: Vec<&str> = manifest.deliberate_differences.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["D1", "D2", "D3", "D4", "D5", "D6", "D7", "D8", "D9"]);
    assert_eq!(manifest.report["layer_summaries"][0]["k"], 2);
    assert_eq!(report.layers, 0..2);
    // The output exists now: a second write fails, and writing into the input is refused.
    assert!(profs_edit_dir(&dir, &pairs, &cfg, &out, &OutputOptions::default()).is_err());
    let e = profs_edit_dir(&dir, &pairs, &cfg, &dir, &OutputOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Model(amend_models::Error::OutputDir { .. })), "{e}");
}

#[test]
fn llama_bf16_edits_are_cast_once() {
    tch::set_num_threads(1);
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_models.json");
    let pairs = pairs_of(&fx["llama"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let cfg = ProfsConfig::default().with_layers(1..2).with_k(1);
    profs_edit_dir(&fixture_dir("llama_bf16"), &pairs, &cfg, &out, &OutputOptions::default())
        .unwrap();
    let m = load(&out, &LoadOptions::default().with_kind(Kind::BFloat16)).unwrap();
    assert_eq!(
        m.params().tensor("model.layers.1.mlp.down_proj.weight").unwrap().kind(),
        Kind::BFloat16
    );
    let orig =
        load(fixture_dir("llama_bf16"), &LoadOptions::default().with_kind(Kind::BFloat16)).unwrap();
    assert!(
        orig.params()
            .tensor("model.layers.0.mlp.down_proj.weight")
            .unwrap()
            .equal(m.params().tensor("model.layers.0.mlp.down_proj.weight").unwrap())
    );
}

#[test]
fn pooling_processes_every_row() {
    tch::set_num_threads(1);
    let model = load(fixture_dir("gpt2"), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let seqs: Vec<Vec<u32>> = (0..7)
        .map(|i| tok.encode(&format!("text number {i} is {}", "long ".repeat(i)), true).unwrap())
        .collect();
    let all = pooled_embeddings(&model, &seqs, &[0, 1], Pooling::MeanMasked, 7, None).unwrap();
    let batched = pooled_embeddings(&model, &seqs, &[0, 1], Pooling::MeanMasked, 3, None).unwrap();
    for (a, b) in all.iter().zip(&batched) {
        assert_eq!(a.size(), vec![7, 32]); // N = 7 with batch 3: 7 rows (the reference: 6)
        Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close("batch-independent", &flat(a), &flat(b));
    }
    // All-positions pooling pads to the longest sequence of the whole side: independent of batch.
    let a = pooled_embeddings(&model, &seqs, &[1], Pooling::MeanAllPositions, 7, None).unwrap();
    let b = pooled_embeddings(&model, &seqs, &[1], Pooling::MeanAllPositions, 2, None).unwrap();
    Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close("all positions", &flat(&a[0]), &flat(&b[0]));
    // N = 120 with batch 50: 120 rows (the reference: 100).
    let many: Vec<Vec<u32>> = (0..120).map(|i| seqs[i % 7].clone()).collect();
    let e = pooled_embeddings(&model, &many, &[1], Pooling::MeanMasked, 50, None).unwrap();
    assert_eq!(e[0].size(), vec![120, 32]);
}

#[test]
fn pair_sampling() {
    let cfg = ProfsConfig::default().with_n_pairs(5);
    let a = sample_pair_indices(20, &cfg).unwrap();
    assert_eq!(a.preferred, a.dispreferred);
    assert_eq!(a.preferred.len(), 5);
    assert_eq!(a, sample_pair_indices(20, &cfg).unwrap(), "seeded");
    let all = sample_pair_indices(3, &cfg).unwrap();
    assert_eq!(all.preferred, vec![0, 1, 2]);
    let ind = sample_pair_indices(
        20,
        &ProfsConfig { pairing: Pairing::IndependentCompat, ..cfg.clone() },
    )
    .unwrap();
    assert_ne!(ind.preferred, ind.dispreferred);
    let pinned = ProfsConfig { indices: Some(vec![4, 2]), ..cfg.clone() };
    assert_eq!(sample_pair_indices(20, &pinned).unwrap().preferred, vec![4, 2]);
    let bad = ProfsConfig { indices: Some(vec![4, 20]), ..cfg.clone() };
    assert!(matches!(sample_pair_indices(20, &bad), Err(Error::InvalidInput { .. })));
    let dup = ProfsConfig { indices: Some(vec![1, 1]), ..cfg };
    assert!(matches!(sample_pair_indices(20, &dup), Err(Error::InvalidInput { .. })));
}

fn pairs3() -> Vec<PreferencePair> {
    vec![
        PreferencePair::new("the cat sat", "the cat shouted"),
        PreferencePair::new("a dog ran", "a dog bit"),
        PreferencePair::new("birds sing", "birds scream"),
    ]
}

type Check = Box<dyn Fn(&Error) -> bool>;

/// Bad input: a typed error naming the item, and the model untouched.
#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    tch::set_num_threads(1);
    let mut model = load(fixture_dir("gpt2"), &LoadOptions::default()).unwrap();
    let before = snapshot(&model);
    let ok = ProfsConfig::default().with_layers(0..2).with_k(1);
    let cases: Vec<(Vec<PreferencePair>, ProfsConfig, Check)> = vec![
        (
            {
                let mut p = pairs3();
                p[1].dispreferred = "   ".into();
                p
            },
            ok.clone(),
            Box::new(|e| matches!(e, Error::InvalidPair { index: 1, side: "dispreferred", .. })),
        ),
        (
            {
                let mut p = pairs3();
                p[2].preferred = String::new();
                p
            },
            ok.clone(),
            Box::new(|e| matches!(e, Error::InvalidPair { index: 2, side: "preferred", .. })),
        ),
        (vec![], ok.clone(), Box::new(|e| matches!(e, Error::InvalidInput { .. }))),
        (
            pairs3(),
            ProfsConfig::default().with_layers(1..3).with_k(1),
            Box::new(|e| matches!(e, Error::LayerRange { start: 1, end: 3, num_layers: 2, .. })),
        ),
        (
            pairs3(),
            ProfsConfig::default().with_layers(0..2).with_k(4),
            Box::new(|e| matches!(e, Error::RankTooLarge { k: 4, n_pairs: 3, hidden: 32 })),
        ),
        (
            pairs3(),
            ProfsConfig::default().with_layers(0..2).with_k(0),
            Box::new(|e| matches!(e, Error::ZeroRank)),
        ),
        (
            pairs3(),
            ProfsConfig::default(),
            Box::new(|e| matches!(e, Error::NoDefaultForModel { num_layers: 2, hidden: 32, .. })),
        ),
        (
            vec![PreferencePair::new("same text", "same text"); 3],
            ok.clone(),
            Box::new(|e| matches!(e, Error::DegenerateLayer { layer: 0 })),
        ),
        (
            pairs3(),
            ProfsConfig { edit_values: false, ..ok.clone() },
            Box::new(|e| matches!(e, Error::NoMatchingTarget { .. })),
        ),
    ];
    for (i, (pairs, cfg, check)) in cases.into_iter().enumerate() {
        let e = profs_edit(&mut model, &pairs, &cfg).unwrap_err();
        assert!(check(&e), "case {i}: unexpected error {e}");
        for (name, t) in &before {
            assert!(t.equal(model.params().tensor(name).unwrap()), "case {i}: {name} changed");
        }
    }
    // Mismatched lists.
    let e = PreferencePair::zip(&["a".into(), "b".into()], &["c".into()]).unwrap_err();
    assert!(matches!(e, Error::PairCountMismatch { preferred: 2, dispreferred: 1, .. }), "{e}");
}

#[test]
fn models_without_tokenizer_or_rank_above_hidden() {
    tch::set_num_threads(1);
    let cfg = Gpt2Config {
        vocab_size: 50,
        n_positions: 16,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        ..Gpt2Config::default()
    };
    let mut m = Gpt2::new_random(cfg, 0, Kind::Float, Device::Cpu).unwrap();
    assert!(matches!(m.config(), ModelConfig::Gpt2(_)));
    let e = profs_edit(&mut m, &pairs3(), &ProfsConfig::default().with_layers(0..1).with_k(1))
        .unwrap_err();
    assert!(matches!(e, Error::Model(amend_models::Error::NoTokenizer { .. })), "{e}");
    // k above the hidden size (8) with enough pairs.
    let many = vec![PreferencePair::new("x", "y"); 10];
    let e =
        profs_edit(&mut m, &many, &ProfsConfig::default().with_layers(0..1).with_k(9)).unwrap_err();
    assert!(matches!(e, Error::RankTooLarge { k: 9, n_pairs: 10, hidden: 8 }), "{e}");
}

/// The logit-lens diagnostics of every direction: energies are `σ_j²/Σσ²` and sum to the
/// layer's explained energy, the token lists are the two ends of `W_U v_j` computed here from
/// the basis independently, and a mis-shaped head is a typed error.
#[test]
fn directions_are_the_two_ends_of_the_logit_lens() {
    tch::set_num_threads(1);
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_models.json");
    let pairs = pairs_of(&fx["gpt2"]);
    let mut m = load(fixture_dir("gpt2"), &LoadOptions::default()).unwrap();
    let w_u = m.lm_head_weight().copy();
    let cfg = ProfsConfig::default().with_layers(0..2).with_k(2);
    let report = profs_edit(&mut m, &pairs, &cfg).unwrap();
    let vocab = w_u.size()[0] as usize;
    let top = amend_edit::profs::LENS_TOKENS.min(vocab);
    for s in &report.layer_summaries {
        assert_eq!(s.directions.len(), s.k_eff, "layer {}", s.layer);
        let total: f64 = s.singular_values.iter().map(|x| x * x).sum();
        let energies: Vec<f64> = s.directions.iter().map(|d| d.energy).collect();
        for (j, e) in energies.iter().enumerate() {
            assert!((e - s.singular_values[j].powi(2) / total).abs() < 1e-12);
        }
        assert!((energies.iter().sum::<f64>() - s.explained_energy).abs() < 1e-9);
        for d in &s.directions {
            assert_eq!((d.top_tokens.len(), d.bottom_tokens.len()), (top, top));
            assert!(d.top_scores.windows(2).all(|w| w[0] >= w[1]), "largest first");
            assert!(d.bottom_scores.windows(2).all(|w| w[0] <= w[1]), "smallest first");
            assert!(d.top_scores[0] > d.bottom_scores[0]);
        }
    }
    // Independently, on a basis from random embeddings: W_U·v by hand, sorted.
    tch::manual_seed(3);
    let opts = (Kind::Float, Device::Cpu);
    let (xp, xn) = (Tensor::randn([12, 16], opts), Tensor::randn([12, 16], opts));
    let basis = amend_edit::profs::profs_basis(&xp, &xn, 0, &cfg.basis_options(3)).unwrap();
    let w_rand = Tensor::randn([40, 16], opts);
    let dirs = basis.directions(&w_rand, 5).unwrap();
    assert_eq!(dirs.len(), 3);
    let v = basis.basis.as_ref().unwrap().to_kind(Kind::Double);
    let scores = w_rand.to_kind(Kind::Double).matmul(&v);
    for (j, d) in dirs.iter().enumerate() {
        let col = flat(&scores.select(1, j as i64));
        let mut order: Vec<usize> = (0..col.len()).collect();
        order.sort_by(|&a, &b| col[b].total_cmp(&col[a]));
        let want_top: Vec<i64> = order[..5].iter().map(|&i| i as i64).collect();
        let want_bottom: Vec<i64> = order.iter().rev().take(5).map(|&i| i as i64).collect();
        assert_eq!(d.top_tokens, want_top, "direction {j}: largest");
        assert_eq!(d.bottom_tokens, want_bottom, "direction {j}: smallest");
        for (got, &i) in d.top_scores.iter().zip(&order[..5]) {
            assert!((got - col[i]).abs() < 1e-5, "direction {j}: score {got} vs {}", col[i]);
        }
    }
    let bad = Tensor::zeros([5, 3], (Kind::Float, Device::Cpu));
    assert!(matches!(basis.directions(&bad, 3), Err(Error::ShapeMismatch { .. })));
}
