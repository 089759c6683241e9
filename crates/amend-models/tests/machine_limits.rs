//! What the machine can run: absurd configurations are refused before anything is allocated, and
//! the parameter count the check uses is exact for every fixture architecture.

mod common;

use amend_models::config::ModelConfig;
use amend_models::{CausalLm, Error, LoadOptions, UnknownFields, load, machine};
use common::{copy_to_temp, model_dir};

fn set_config(dir: &std::path::Path, field: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v[field] = value;
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn parameter_count_is_exact_for_every_fixture() {
    for name in [
        "gpt2",
        "gpt2_untied",
        "gpt2_legacy",
        "llama",
        "llama3_rope",
        "llama_linear_bias",
        "llama_sharded",
        "mistral",
        "qwen2",
        "qwen2_sliding",
    ] {
        let dir = model_dir(name);
        let model = load(&dir, &LoadOptions::default()).unwrap();
        let numel: i64 = model.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
        let cfg = ModelConfig::from_file(dir.join("config.json"), UnknownFields::Reject).unwrap();
        assert_eq!(machine::parameter_count(&cfg), numel as f64, "{name}");
    }
}

#[test]
fn absurd_sizes_are_refused_before_allocation() {
    let mem = machine::total_memory().expect("this test needs the machine's memory size");
    for (fixture, field, value) in [
        ("gpt2", "n_layer", serde_json::json!(1_000_000_000u64)),
        ("gpt2", "n_embd", serde_json::json!(1u64 << 40)),
        ("gpt2", "vocab_size", serde_json::json!(u64::MAX / 2)),
        ("llama", "num_hidden_layers", serde_json::json!(1_000_000_000u64)),
        ("llama", "intermediate_size", serde_json::json!(1u64 << 50)),
    ] {
        let d = copy_to_temp(&model_dir(fixture));
        set_config(d.path(), field, value.clone());
        if field == "n_embd" {
            set_config(d.path(), "n_head", serde_json::json!(1));
        }
        if field == "num_hidden_layers" {
            // keep the layer list consistent if the fixture has one
            let path = d.path().join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("layer_types");
            std::fs::write(&path, v.to_string()).unwrap();
        }
        let err = match load(d.path(), &LoadOptions::default()) {
            Ok(_) => panic!("{fixture} with {field} = {value} should not load"),
            Err(e) => e,
        };
        let msg = err.to_string();
        match &err {
            Error::ModelTooLarge { path, memory, bytes, .. } => {
                assert!(path.ends_with("config.json"), "{msg}");
                assert_eq!(*memory, mem);
                assert!(*bytes > mem as f64);
                assert!(msg.contains(&format!("{field} = {value}")), "{msg}");
            }
            Error::Config { field: f, .. } => assert_eq!(f, field, "{msg}"),
            e => panic!("{fixture} {field}: {e:?}"),
        }
    }
}

#[test]
fn random_models_are_checked_too() {
    let mut cfg = amend_models::Gpt2Config { n_layer: 1 << 40, ..Default::default() };
    cfg.n_embd = 768;
    let err =
        amend_models::Gpt2::new_random(cfg, 0, tch::Kind::Float, tch::Device::Cpu).err().unwrap();
    assert!(matches!(err, Error::ModelTooLarge { .. }), "{err:?}");
    let small = amend_models::Gpt2Config {
        vocab_size: 64,
        n_positions: 16,
        n_embd: 8,
        n_layer: 2,
        n_head: 2,
        ..Default::default()
    };
    let m = amend_models::Gpt2::new_random(small.clone(), 0, tch::Kind::Float, tch::Device::Cpu)
        .unwrap();
    let numel: i64 = m.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(machine::parameter_count(&ModelConfig::Gpt2(small)), numel as f64);
}
