//! Texts that are not empty but tokenise to nothing: an edit target or a preference-pair text
//! made only of characters the tokenizer's normalizer removes. Both are typed errors naming the
//! item, and the model is left unchanged.

use std::path::{Path, PathBuf};

use amend_edit::EditRequest;
use amend_edit::Error;
use amend_edit::ft::{EditMode, FtOptions, FtRecipe, ParamSelector, WeightSnapshot, ft_edit};
use amend_edit::profs::{PreferencePair, ProfsConfig, profs_edit};
use amend_models::{CausalLm, LoadOptions, Model, load};

fn gpt2_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../amend-models/tests/fixtures/models/gpt2")
}

/// The GPT-2 fixture with a normalizer that deletes `#` and strips surrounding whitespace, so
/// `" ###"` (a target as it is scored, with its leading space) becomes the empty string.
fn model_dropping_hashes(dir: &Path) -> Model {
    tch::set_num_threads(1);
    let src = gpt2_dir();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer.json")).unwrap()).unwrap();
    tok["normalizer"] = serde_json::json!({
        "type": "Sequence",
        "normalizers": [
            {"type": "Replace", "pattern": {"String": "#"}, "content": ""},
            {"type": "Strip", "strip_left": true, "strip_right": true}
        ]
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    let model = load(dir, &LoadOptions::default()).unwrap();
    let t = model.tokenizer().unwrap();
    assert!(t.encode(" ###", false).unwrap().is_empty(), "the normalizer should drop everything");
    assert!(!t.encode(" Rome", false).unwrap().is_empty());
    model
}

#[test]
fn edit_target_that_tokenises_to_nothing_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = model_dropping_hashes(tmp.path());
    let before = WeightSnapshot::capture(&model, None).unwrap();
    let requests = vec![
        EditRequest::new("The capital of France is", "Rome").with_target_true("Paris"),
        EditRequest::new("The capital of Spain is", "###").with_target_true("Madrid"),
    ];
    let recipe =
        FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![1] }).with_mode(EditMode::Batched);
    let e = ft_edit(&mut model, &requests, &recipe, &FtOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidEdit { index: 1, field, reason }
            if field == "target_new" && reason.contains("tokenises to nothing")),
        "{e}"
    );
    // The old answer is checked the same way.
    let requests = vec![EditRequest::new("The capital of Spain is", "Rome").with_target_true("#")];
    let e = ft_edit(&mut model, &requests, &recipe, &FtOptions::default()).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidEdit { index: 0, field, .. } if field == "target_true"),
        "{e}"
    );
    for (n, t) in before.tensors() {
        assert!(t.equal(model.params().tensor(n).unwrap()), "{n} changed");
    }
}

#[test]
fn preference_text_that_tokenises_to_nothing_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = model_dropping_hashes(tmp.path());
    let before = WeightSnapshot::capture(&model, None).unwrap();
    let pairs = vec![
        PreferencePair::new("Thank you, that was kind.", "Thanks for nothing."),
        PreferencePair::new("I see your point.", "## ###"),
        PreferencePair::new("The food was cold.", "The food was garbage."),
    ];
    let cfg = ProfsConfig::default().with_layers(0..2).with_k(1);
    let e = profs_edit(&mut model, &pairs, &cfg).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidPair { index: 1, side: "dispreferred", reason }
            if reason.contains("no tokens")),
        "{e}"
    );
    for (n, t) in before.tensors() {
        assert!(t.equal(model.params().tensor(n).unwrap()), "{n} changed");
    }
}
