//! Bad checkpoints and bad calls give typed errors naming the file, tensor or field; never a
//! panic.

mod common;

use std::path::Path;

use amend_models::{CausalLm, Error, GenerationConfig, LoadOptions, generate_ids, load};
use common::{copy_to_temp, model_dir};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use tch::{Kind, Tensor};

/// Rewrites `dir/model.safetensors` through `edit`, which gets (name, dtype, shape, bytes) rows.
fn rewrite_weights(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut rows: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut rows);
    let views: Vec<(String, TensorView<'_>)> = rows
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> Error {
    match load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_to_temp(&model_dir("gpt2"));
    rewrite_weights(d.path(), |rows| rows.retain(|r| r.0 != "transformer.h.1.mlp.c_fc.bias"));
    match load_err(d.path()) {
        Error::MissingTensor { name, .. } => assert_eq!(name, "transformer.h.1.mlp.c_fc.bias"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn extra_tensor_is_named() {
    let d = copy_to_temp(&model_dir("llama"));
    rewrite_weights(d.path(), |rows| {
        rows.push((
            "model.layers.0.mlp.extra.weight".into(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let e = load_err(d.path());
    assert!(e.to_string().contains("model.layers.0.mlp.extra.weight"), "{e}");
    match e {
        Error::UnexpectedTensor { name, path, model_type } => {
            assert_eq!(name, "model.layers.0.mlp.extra.weight");
            assert!(path.ends_with("model.safetensors"));
            assert_eq!(model_type, "llama");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let d = copy_to_temp(&model_dir("qwen2"));
    rewrite_weights(d.path(), |rows| {
        let r = rows.iter_mut().find(|r| r.0 == "model.layers.0.self_attn.k_proj.weight").unwrap();
        r.2 = vec![r.2[1], r.2[0]];
    });
    match load_err(d.path()) {
        Error::TensorShape { name, expected, got, .. } => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!(expected, vec![16, 32]);
            assert_eq!(got, vec![32, 16]);
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let d = copy_to_temp(&model_dir("gpt2"));
    rewrite_weights(d.path(), |rows| {
        let r = rows.iter_mut().find(|r| r.0 == "transformer.ln_f.bias").unwrap();
        r.1 = safetensors::Dtype::I32;
    });
    match load_err(d.path()) {
        Error::TensorDtype { name, dtype, .. } => {
            assert_eq!(name, "transformer.ln_f.bias");
            assert_eq!(dtype, "I32");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn truncated_safetensors_is_detected_before_reading() {
    let d = copy_to_temp(&model_dir("gpt2"));
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    match load_err(d.path()) {
        Error::TruncatedFile { path, expected, actual } => {
            assert!(path.ends_with("model.safetensors"));
            assert_eq!(expected, bytes.len() as u64);
            assert_eq!(actual, (bytes.len() / 2) as u64);
        }
        e => panic!("{e:?}"),
    }
    let msg = load_err(d.path()).to_string();
    assert!(
        msg.contains(&format!(
            "model.safetensors: the file has {} bytes but its header describes {}: the file is \
             truncated",
            bytes.len() / 2,
            bytes.len()
        )),
        "{msg}"
    );
    // Bytes after the last tensor (safetensors' MetadataIncompleteBuffer).
    let mut longer = bytes.clone();
    longer.extend([0u8; 5]);
    std::fs::write(&p, &longer).unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("the last 5 bytes belong to no tensor"), "{msg}");
    // A file cut inside the header (HeaderTooLarge) or inside the header length (HeaderTooSmall).
    std::fs::write(&p, &bytes[..20]).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let msg = corrupt_message(d.path(), None);
    assert!(
        msg.ends_with(&format!(
            "model.safetensors: the header says it is {n} bytes long but the file has 20 bytes: \
             the file is truncated or not a safetensors file"
        )),
        "{msg}"
    );
    std::fs::write(&p, &bytes[..3]).unwrap();
    let msg = corrupt_message(d.path(), None);
    assert!(msg.contains("model.safetensors: the file has only 3 bytes, fewer than the 8-byte"));
}

/// The message of the [`Error::CorruptSafetensors`] that loading `dir` gives, checking the file
/// and tensor it names; never a bare safetensors enum name.
fn corrupt_message(dir: &Path, tensor: Option<&str>) -> String {
    let e = load_err(dir);
    let msg = e.to_string();
    match &e {
        Error::CorruptSafetensors { path, tensor: t, .. } => {
            assert!(path.ends_with("model.safetensors"), "{path:?}");
            assert_eq!(t.as_deref(), tensor, "{msg}");
        }
        e => panic!("{e:?}"),
    }
    assert!(msg.starts_with(&dir.join("model.safetensors").display().to_string()), "{msg}");
    for bare in ["HeaderTooLarge", "HeaderTooSmall", "MetadataIncompleteBuffer", "invalid JSON"] {
        assert!(!msg.contains(bare), "{msg}");
    }
    msg
}

/// Replaces the header of `dir/model.safetensors` by `edit` of its JSON text, keeping the data.
fn rewrite_header(dir: &Path, edit: impl FnOnce(&str) -> String) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = edit(std::str::from_utf8(&bytes[8..8 + n]).unwrap());
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
}

fn header_json(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn corrupt_headers_say_what_is_wrong_in_words() {
    let src = copy_to_temp(&model_dir("gpt2"));
    let header = header_json(src.path());
    let (name, first) = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .min_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap())
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let end = first["data_offsets"][1].as_u64().unwrap();
    let fresh = || {
        let d = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(src.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), d.path().join(f.file_name())).unwrap();
        }
        d
    };

    // A header length of 9e18 (HeaderTooLarge).
    let d = fresh();
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&9_000_000_000_000_000_000u64.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let msg = corrupt_message(d.path(), None);
    assert!(
        msg.contains(&format!(
            "the header says it is 9000000000000000000 bytes long but the file has {} bytes",
            bytes.len()
        )),
        "{msg}"
    );

    // Valid JSON, bad offsets: the tensor is named and the numbers given.
    let d = fresh();
    rewrite_header(d.path(), |h| {
        h.replacen(&format!("\"data_offsets\":[0,{end}]"), &format!("[0,{}]", end - 4), 1).replacen(
            "[0,",
            "\"data_offsets\":[0,",
            1,
        )
    });
    let msg = corrupt_message(d.path(), Some(&name));
    assert!(
        msg.contains(&format!(
            "tensor `{name}`: its data_offsets [0, {}] hold {} bytes",
            end - 4,
            end - 4
        )),
        "{msg}"
    );
    assert!(msg.contains(&format!("needs {end}")), "{msg}");

    // Overlapping offsets.
    let d = fresh();
    let mut h = header.clone();
    let (other, _) = h
        .iter()
        .find(|(k, v)| *k != "__metadata__" && v["data_offsets"][0].as_u64() == Some(end))
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let o = h.get_mut(&other).unwrap();
    let len = o["data_offsets"][1].as_u64().unwrap() - end;
    o["data_offsets"] = serde_json::json!([end - 4, end - 4 + len]);
    let text = serde_json::to_string(&h).unwrap();
    rewrite_header(d.path(), |_| text.clone());
    let msg = corrupt_message(d.path(), Some(&other));
    assert!(
        msg.contains(&format!("overlap those of tensor `{name}`, which end at {end}")),
        "{msg}"
    );

    // A duplicate key in an otherwise valid JSON header.
    let d = fresh();
    let entry = serde_json::to_string(&first).unwrap();
    rewrite_header(d.path(), |h| format!("{{\"{name}\":{entry},{}", &h[1..]));
    let msg = corrupt_message(d.path(), Some(&name));
    assert!(msg.contains("it is listed more than once in the header"), "{msg}");

    // An unknown dtype, and a header that is not JSON.
    let d = fresh();
    let dtype = first["dtype"].as_str().unwrap().to_string();
    rewrite_header(d.path(), |h| h.replacen(&format!("\"{dtype}\""), "\"F99\"", 1));
    let msg = corrupt_message(
        d.path(),
        Some(
            &header
                .iter()
                .find(|(k, v)| *k != "__metadata__" && v["dtype"] == dtype.as_str())
                .map(|(k, _)| k.clone())
                .unwrap_or_default(),
        ),
    );
    assert!(msg.contains("unknown dtype `F99`"), "{msg}");
    let d = fresh();
    rewrite_header(d.path(), |h| h.replacen('{', "[", 1));
    let msg = corrupt_message(d.path(), None);
    assert!(msg.contains("header is not a JSON object"), "{msg}");
}

#[cfg(unix)]
#[test]
fn symbolic_link_loops_are_named_as_loops() {
    use std::os::unix::fs::symlink;
    // model.safetensors -> b -> model.safetensors
    let d = copy_to_temp(&model_dir("gpt2"));
    let weights = d.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    symlink("b", &weights).unwrap();
    symlink("model.safetensors", d.path().join("b")).unwrap();
    let e = load_err(d.path());
    let msg = e.to_string();
    assert!(matches!(e, Error::BrokenLink { .. }), "{e:?}");
    assert!(msg.contains("model.safetensors: it is a loop of symbolic links"), "{msg}");
    assert!(msg.contains("b -> "), "{msg}");
    assert!(!msg.contains("no model.safetensors"), "{msg}");
    // A link to nothing.
    std::fs::remove_file(d.path().join("b")).unwrap();
    let msg = load_err(d.path()).to_string();
    assert!(msg.contains("model.safetensors: it is a symbolic link to"), "{msg}");
    assert!(msg.contains("which does not exist"), "{msg}");
    // The model folder itself: a -> b -> a.
    let t = tempfile::tempdir().unwrap();
    symlink(t.path().join("b"), t.path().join("a")).unwrap();
    symlink(t.path().join("a"), t.path().join("b")).unwrap();
    let e = load_err(&t.path().join("a"));
    let msg = e.to_string();
    assert!(matches!(e, Error::BrokenLink { .. }), "{e:?}");
    assert!(
        msg.starts_with(&format!(
            "{}: it is a loop of symbolic links",
            t.path().join("a").display()
        )),
        "{msg}"
    );
}

#[test]
fn read_safetensors_checks_like_loading() {
    let d = copy_to_temp(&model_dir("gpt2"));
    let p = d.path().join("model.safetensors");
    let all = amend_models::read_safetensors(&p).unwrap();
    assert_eq!(all.len(), header_json(d.path()).keys().filter(|k| *k != "__metadata__").count());
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 7]).unwrap();
    let msg = amend_models::read_safetensors(&p).unwrap_err().to_string();
    assert!(msg.contains("the file is truncated"), "{msg}");
}

#[test]
fn corrupt_header_is_a_safetensors_error() {
    let d = copy_to_temp(&model_dir("gpt2"));
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = b'!';
    std::fs::write(&p, &bytes).unwrap();
    let msg = corrupt_message(d.path(), None);
    assert!(msg.contains("header is not a JSON object"), "{msg}");
}

#[test]
fn missing_weights_and_missing_shards_are_named() {
    let d = copy_to_temp(&model_dir("gpt2"));
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(matches!(load_err(d.path()), Error::NoWeights { .. }));

    let d = copy_to_temp(&model_dir("llama_sharded"));
    std::fs::remove_file(d.path().join("model-00002-of-00004.safetensors")).unwrap();
    match load_err(d.path()) {
        Error::Io { path, .. } => assert!(path.ends_with("model-00002-of-00004.safetensors")),
        e => panic!("{e:?}"),
    }
}

#[test]
fn unknown_architecture_is_named() {
    let d = copy_to_temp(&model_dir("gpt2"));
    edit_config(d.path(), |v| v["model_type"] = "bert".into());
    match load_err(d.path()) {
        Error::UnknownArchitecture { model_type, path } => {
            assert_eq!(model_type, "bert");
            assert!(path.ends_with("config.json"));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn unknown_config_field_is_named_and_can_be_allowed() {
    let d = copy_to_temp(&model_dir("mistral"));
    edit_config(d.path(), |v| v["attention_chunk_size"] = 8.into());
    match load_err(d.path()) {
        Error::Config { field, .. } => assert_eq!(field, "attention_chunk_size"),
        e => panic!("{e:?}"),
    }
    let opts = LoadOptions {
        unknown_config_fields: amend_models::UnknownFields::Warn,
        ..LoadOptions::default()
    };
    load(d.path(), &opts).unwrap();
}

#[test]
fn unsupported_config_values_are_named() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 4] = [
        (
            "llama",
            |v| v["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
            "rope_parameters.rope_type",
        ),
        ("llama", |v| v["hidden_act"] = "gelu_10".into(), "hidden_act"),
        ("llama", |v| v["num_key_value_heads"] = 3.into(), "num_key_value_heads"),
        ("gpt2", |v| v["n_positions"] = serde_json::Value::String("64".into()), "n_positions"),
    ];
    for (name, edit, field) in cases {
        let d = copy_to_temp(&model_dir(name));
        edit_config(d.path(), edit);
        match load_err(d.path()) {
            Error::Config { field: f, path, .. } => {
                assert_eq!(f, field);
                assert!(path.ends_with("config.json"));
            }
            e => panic!("{field}: {e:?}"),
        }
    }
}

#[test]
fn invalid_json_is_named() {
    let d = copy_to_temp(&model_dir("gpt2"));
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    match load_err(d.path()) {
        Error::Json { path, .. } => assert!(path.ends_with("config.json")),
        e => panic!("{e:?}"),
    }
}

#[test]
fn tokenizer_larger_than_the_vocabulary_is_rejected() {
    let d = copy_to_temp(&model_dir("gpt2"));
    let path = d.path().join("tokenizer.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // A vocabulary entry whose id has no embedding row (the model has 320).
    v["model"]["vocab"]["zzz_far"] = 400.into();
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    match load_err(d.path()) {
        Error::TokenizerVocab { max_id, model_vocab, path, .. } => {
            assert_eq!(max_id, 400);
            assert_eq!(model_vocab, 320);
            assert!(path.ends_with("tokenizer.json"));
        }
        e => panic!("{e:?}"),
    }
    std::fs::write(&path, "garbage").unwrap();
    match load_err(d.path()) {
        Error::Tokenizer { path, .. } => assert!(path.unwrap().ends_with("tokenizer.json")),
        e => panic!("{e:?}"),
    }
}

#[test]
fn bad_forward_inputs_are_typed_errors() {
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let ids = |v: &[i64], shape: &[i64]| Tensor::from_slice(v).view(shape);
    let invalid = |r: amend_models::Result<Tensor>, name: &str| match r {
        Err(Error::InvalidInput { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected InvalidInput({name}), got {other:?}"),
    };
    invalid(model.forward(&ids(&[1, 2, 320], &[1, 3]), None), "input_ids");
    invalid(model.forward(&ids(&[1, -1], &[1, 2]), None), "input_ids");
    invalid(model.forward(&ids(&[1, 2], &[2]), None), "input_ids");
    invalid(model.forward(&Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]), None), "input_ids");
    invalid(
        model.forward(&Tensor::zeros([1, 0], (Kind::Int64, tch::Device::Cpu)), None),
        "input_ids",
    );
    invalid(
        model.forward(&Tensor::ones([1, 65], (Kind::Int64, tch::Device::Cpu)), None),
        "input_ids",
    );
    match model.forward(&ids(&[1, 2, 3], &[1, 3]), Some(&ids(&[1, 1], &[1, 2]))) {
        Err(Error::ShapeMismatch { expected, got, .. }) => {
            assert_eq!(expected, vec![1, 3]);
            assert_eq!(got, vec![1, 2]);
        }
        other => panic!("{other:?}"),
    }
    // Generation settings.
    let bad = [
        GenerationConfig { temperature: 0.0, ..GenerationConfig::sampling(4, 1.0, 0) },
        GenerationConfig { top_p: Some(1.5), ..GenerationConfig::sampling(4, 1.0, 0) },
        GenerationConfig { top_k: Some(0), ..GenerationConfig::sampling(4, 1.0, 0) },
        GenerationConfig { batch_size: 0, ..GenerationConfig::greedy(4) },
        GenerationConfig::greedy(64), // prompt + 64 > 64 positions
    ];
    for cfg in bad {
        assert!(
            matches!(generate_ids(&model, &[vec![1, 2]], &cfg), Err(Error::InvalidInput { .. })),
            "{cfg:?}"
        );
    }
    // A KV cache of the wrong batch size.
    let mut cache = model.new_kv_cache(2, 8).unwrap();
    let r = model.forward_with(&ids(&[1, 2], &[1, 2]), None, Some(&mut cache), Default::default());
    assert!(matches!(r, Err(Error::InvalidInput { name: "cache", .. })));
}

#[test]
fn fully_padded_rows_stay_finite() {
    let model = load(model_dir("llama"), &LoadOptions::default()).unwrap();
    let ids = Tensor::from_slice(&[5i64, 6, 7, 0, 0, 0]).view([2, 3]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0]).view([2, 3]);
    let logits = model.forward_no_grad(&ids, Some(&mask)).unwrap();
    assert!(logits.isfinite().all().int64_value(&[]) == 1);
    let alone = model.forward_no_grad(&ids.narrow(0, 0, 1), None).unwrap();
    assert!((logits.narrow(0, 0, 1) - alone).abs().max().double_value(&[]) < 1e-5);
}

/// Sets `field` of the JSON object file `path`.
fn set_json_field(path: &Path, field: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[field] = value;
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn special_ids_outside_the_vocabulary_load_and_fail_only_where_used() {
    // What transformers saves for a GPT-2 with a small vocabulary: GPT2Config's default
    // bos/eos 50256 in config.json and generation_config.json (the model has 320 rows).
    let d = copy_to_temp(&model_dir("gpt2"));
    for file in ["config.json", "generation_config.json"] {
        set_json_field(&d.path().join(file), "bos_token_id", 50256.into());
        set_json_field(&d.path().join(file), "eos_token_id", 50256.into());
    }
    let model = load(d.path(), &LoadOptions::default()).expect("loads as in transformers");
    let tok = model.tokenizer().unwrap();
    assert_eq!(tok.bos_token_id(), None);
    assert!(tok.eos_token_ids().is_empty());
    let bad: Vec<(String, &str, u32)> = tok
        .out_of_vocab_ids()
        .iter()
        .map(|o| (o.file.file_name().unwrap().to_string_lossy().into_owned(), o.field, o.id))
        .collect();
    assert_eq!(
        bad,
        vec![
            ("config.json".into(), "bos_token_id", 50256),
            ("config.json".into(), "eos_token_id", 50256),
            ("generation_config.json".into(), "bos_token_id", 50256),
            ("generation_config.json".into(), "eos_token_id", 50256),
        ]
    );
    // Scoring without a BOS token and generating from a prompt work.
    let s = amend_models::score_texts(&model, &["the cat"], &Default::default()).unwrap();
    assert!(s[0].count() > 0);
    let g = generate_ids(&model, &[vec![5, 6]], &GenerationConfig::greedy(3)).unwrap();
    assert_eq!(g[0].token_ids.len(), 3);
    // Using the id is an error naming the file and the field.
    let opts = amend_models::ScoreOptions { prepend_bos: true, ..Default::default() };
    let e = amend_models::score_texts(&model, &["the cat"], &opts).unwrap_err();
    match &e {
        Error::SpecialTokenOutOfVocab { path, field, id, model_vocab, .. } => {
            assert!(path.ends_with("config.json"), "{path:?}");
            assert_eq!((*field, *id, *model_vocab), ("bos_token_id", 50256, 320));
        }
        e => panic!("{e:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("config.json") && msg.contains("`bos_token_id` = 50256"), "{msg}");
    assert!(!msg.contains("tokenizer"), "{msg}");
    match generate_ids(&model, &[vec![]], &GenerationConfig::greedy(3)).unwrap_err() {
        Error::SpecialTokenOutOfVocab { field: "bos_token_id", .. } => {}
        e => panic!("{e:?}"),
    }
}

#[test]
fn out_of_vocabulary_generation_config_id_is_blamed_on_generation_config() {
    let d = copy_to_temp(&model_dir("gpt2"));
    set_json_field(&d.path().join("generation_config.json"), "bos_token_id", 999.into());
    let model = load(d.path(), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    // config.json's valid bos (0) is still the tokenizer's; the bad id is recorded where it is.
    assert_eq!(tok.bos_token_id(), Some(0));
    let o = &tok.out_of_vocab_ids()[0];
    assert!(o.file.ends_with("generation_config.json"));
    assert_eq!((o.field, o.id), ("bos_token_id", 999));
    assert_eq!(model.generation_config().bos_token_id, None);
}

// ---- Long inputs (issue 12 point 8) ----

/// A text of about `words` words (the tiny tokenizers give at least one token per word).
fn long_text(words: usize) -> String {
    let base = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away"];
    (0..words).map(|i| base[i % base.len()]).collect::<Vec<_>>().join(" ")
}

fn ids_of(model: &amend_models::Model, text: &str) -> Vec<u32> {
    model.tokenizer().unwrap().encode(text, true).unwrap()
}

#[test]
fn texts_longer_than_the_context_are_refused_naming_text_length_and_field() {
    use amend_models::{ScoreOptions, score_texts};
    for (name, context, field) in
        [("gpt2", 64, "n_positions"), ("llama", 128, "max_position_embeddings")]
    {
        let model = load(model_dir(name), &LoadOptions::default()).unwrap();
        let long = long_text(200);
        let n = ids_of(&model, &long).len();
        assert!(n > context, "{name}: {n} tokens");
        // The long text is the second one: nothing is scored, even with one text per batch.
        let opts = ScoreOptions { batch_size: 1, ..Default::default() };
        let e = score_texts(&model, &["the cat", &long], &opts).unwrap_err();
        let msg = e.to_string();
        match e {
            Error::TooLong { index, tokens, context: c, field: f, .. } => {
                assert_eq!((index, tokens, c, f), (1, n, context, field), "{name}");
            }
            e => panic!("{name}: {e:?}"),
        }
        assert!(msg.contains(&format!("text 1 has {n} tokens")), "{msg}");
        assert!(msg.contains(&format!("context of {context} tokens (`{field}`")), "{msg}");
        // A text of exactly the context is scored.
        let ids = ids_of(&model, &long);
        let s = amend_models::score_ids(&model, &[ids[..context].to_vec()], &[1], 1).unwrap();
        assert_eq!(s[0].count(), context - 1);
        // One more token: GPT-2 has no position for it, so the id-level functions refuse too
        // (a RoPE model may run past its context on purpose).
        let over = amend_models::score_ids(&model, &[ids[..context + 1].to_vec()], &[1], 1);
        let pairs = [("the cat", long.as_str())];
        let cont = amend_models::score_continuations(&model, &pairs, &ScoreOptions::default());
        if name == "gpt2" {
            assert!(matches!(over, Err(Error::TooLong { index: 0, field: "n_positions", .. })));
            assert!(matches!(cont, Err(Error::TooLong { field: "n_positions", .. })), "{cont:?}");
        } else {
            assert!(over.is_ok() && cont.is_ok(), "{name}");
        }
        assert_eq!(amend_models::context_length(model.config()), (context, field));
    }
}

#[test]
fn max_tokens_keeps_the_first_tokens_and_says_how_many_were_cut() {
    use amend_models::{ScoreOptions, score_ids, score_texts};
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let long = long_text(200);
    let ids = ids_of(&model, &long);
    let opts = ScoreOptions { max_tokens: Some(20), ..Default::default() };
    let s = score_texts(&model, &[&long, "the cat"], &opts).unwrap();
    assert_eq!(s[0].token_ids, ids[..20]);
    assert_eq!(s[0].truncated, ids.len() - 20);
    assert_eq!(s[1].truncated, 0, "short texts are not cut");
    let direct = score_ids(&model, &[ids[..20].to_vec()], &[1], 1).unwrap();
    assert_eq!(s[0].logprobs, direct[0].logprobs);
    // GPT-2 has no position past n_positions: a cap above it does not help a long text.
    let opts = ScoreOptions { max_tokens: Some(100), ..Default::default() };
    match score_texts(&model, &[&long], &opts).unwrap_err() {
        Error::TooLong { tokens: 100, context: 64, field: "n_positions", .. } => {}
        e => panic!("{e:?}"),
    }
    // A RoPE model may be asked to go past its context explicitly.
    let llama = load(model_dir("llama"), &LoadOptions::default()).unwrap();
    let opts = ScoreOptions { max_tokens: Some(150), ..Default::default() };
    let s = score_texts(&llama, &[&long], &opts).unwrap();
    assert_eq!((s[0].token_ids.len(), s[0].count()), (150, 149));
    assert!(s[0].logprobs.iter().all(|x| x.is_finite()));
    for cap in [0, 1] {
        let opts = ScoreOptions { max_tokens: Some(cap), ..Default::default() };
        assert!(matches!(
            score_texts(&model, &["the cat"], &opts).unwrap_err(),
            Error::InvalidInput { name: "max_tokens", .. }
        ));
    }
}

#[test]
fn texts_with_nothing_to_score_are_refused_not_given_perplexity_one() {
    use amend_models::{ScoreOptions, TokenScores, corpus_perplexity, score_texts};
    for name in ["gpt2", "llama"] {
        let model = load(model_dir(name), &LoadOptions::default()).unwrap();
        // Without the tokenizer's special tokens, so that "a" is one token on both models.
        let plain = ScoreOptions { add_special_tokens: false, ..Default::default() };
        let tok = model.tokenizer().unwrap();
        let one = (b'a'..=b'z')
            .map(|c| (c as char).to_string())
            .find(|t| tok.encode(t, false).unwrap().len() == 1)
            .expect("a one-letter text of one token");
        let bos = ScoreOptions { prepend_bos: true, ..plain };
        for (text, opts, tokens, needle) in [
            ("", plain, 0, "has 0 tokens (after tokenisation): nothing to score"),
            (one.as_str(), plain, 1, "has 1 token (after tokenisation): nothing to score"),
            ("", bos, 1, "has 1 token (including the prepended BOS)"),
        ] {
            // The bad text is the second one; the first is fine.
            let e = score_texts(&model, &["the cat sat", text], &opts).unwrap_err();
            let msg = e.to_string();
            match e {
                Error::NothingToScore { index: 1, tokens: t, .. } if t == tokens => {}
                e => panic!("{name} {text:?}: {e:?}"),
            }
            assert!(msg.contains("text 1") && msg.contains(needle), "{name}: {msg}");
        }
    }
    // Means over no tokens are undefined, not perfect.
    let empty = TokenScores { token_ids: vec![3], first_scored: 1, logprobs: vec![], truncated: 0 };
    assert!(empty.mean_nll().is_nan() && empty.perplexity().is_nan());
    assert!(corpus_perplexity(&[empty]).is_nan());
    assert!(corpus_perplexity(&[]).is_nan());
}

#[test]
fn stride_scores_every_token_once_in_the_first_window_that_holds_it() {
    use amend_models::{ScoreOptions, score_ids, score_texts};
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let long = long_text(120);
    let ids = ids_of(&model, &long);
    let n = ids.len();
    for (window, stride) in [(64usize, 16usize), (24, 23), (10, 1)] {
        let opts = ScoreOptions {
            max_tokens: (window != 64).then_some(window),
            stride: Some(stride),
            batch_size: 3,
            ..Default::default()
        };
        let s = score_texts(&model, &[&long, "the cat"], &opts).unwrap();
        assert_eq!(s[0].token_ids, ids);
        assert_eq!((s[0].count(), s[0].truncated), (n - 1, 0), "every token after the first");
        // Token j is scored in the first window k·stride.. that holds it, given the window's
        // tokens before it.
        let mut ctx = Vec::new();
        for j in 1..n {
            let k = if j < window { 0 } else { (j - window + 1).div_ceil(stride) };
            ctx.push(ids[k * stride..=j].to_vec());
        }
        let starts: Vec<usize> = ctx.iter().map(|c| c.len() - 1).collect();
        let want: Vec<f32> =
            score_ids(&model, &ctx, &starts, 16).unwrap().iter().map(|t| t.logprobs[0]).collect();
        for (j, (a, b)) in s[0].logprobs.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "window {window} stride {stride} token {}: {a} {b}",
                j + 1
            );
        }
        // A text shorter than the window is scored as without windows (up to batch padding).
        let plain = score_texts(&model, &["the cat"], &ScoreOptions::default()).unwrap();
        assert_eq!(s[1].count(), plain[0].count());
        for (a, b) in s[1].logprobs.iter().zip(&plain[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
    }
    // Bad windows are refused before anything runs.
    for (max_tokens, stride, name) in
        [(None, 64, "stride"), (Some(10), 10, "stride"), (Some(65), 8, "max_tokens")]
    {
        let opts = ScoreOptions { max_tokens, stride: Some(stride), ..Default::default() };
        match score_texts(&model, &[&long], &opts).unwrap_err() {
            Error::InvalidInput { name: got, .. } => assert_eq!(got, name),
            e => panic!("{e:?}"),
        }
    }
}

#[test]
fn header_over_the_cap_and_gaps_between_tensors_are_described() {
    // A header length over safetensors' 100 MB cap in a (sparse) file long enough to hold it.
    let d = copy_to_temp(&model_dir("gpt2"));
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&100_000_001u64.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100_000_100).unwrap();
    let msg = corrupt_message(d.path(), None);
    assert!(msg.contains("the header says it is 100000001 bytes long, more than the 100 MB"));

    // A gap: the last tensor moved 4 bytes on (the file grown to match).
    let d = copy_to_temp(&model_dir("gpt2"));
    let mut h = header_json(d.path());
    let (last, end) = h
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["data_offsets"][1].as_u64().unwrap()))
        .max_by_key(|x| x.1)
        .unwrap();
    let begin = h[&last]["data_offsets"][0].as_u64().unwrap();
    h[&last]["data_offsets"] = serde_json::json!([begin + 4, end + 4]);
    let text = serde_json::to_string(&h).unwrap();
    rewrite_header(d.path(), |_| text.clone());
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend([0u8; 4]);
    std::fs::write(&p, &bytes).unwrap();
    let msg = corrupt_message(d.path(), Some(&last));
    assert!(
        msg.contains(&format!("leave bytes {begin}..{} of the data unused", begin + 4)),
        "{msg}"
    );
}

#[test]
fn non_finite_weights_are_refused_at_load_or_loaded_on_request() {
    use amend_models::NonFiniteWeights;
    for name in ["gpt2", "llama"] {
        let tmp = copy_to_temp(&model_dir(name));
        let file = tmp.path().join("model.safetensors");
        let mut tensors = Tensor::read_safetensors(&file).unwrap();
        let (key, t) = tensors.iter_mut().find(|(_, t)| t.dim() == 2).unwrap();
        let key = key.clone();
        let _ = t.get(1).get(2).fill_(f64::INFINITY);
        let _ = t.get(2).get(0).fill_(f64::NAN);
        Tensor::write_safetensors(&tensors, &file).unwrap();
        match load(tmp.path(), &LoadOptions::default()).map(|_| ()).unwrap_err() {
            Error::NonFiniteWeights { path, name: n, count, index, value, overflow } => {
                assert_eq!(path, file.canonicalize().unwrap(), "{name}");
                assert_eq!((n, count, index, overflow), (key.clone(), 2, vec![1, 2], None));
                assert_eq!(value, f64::INFINITY);
            }
            e => panic!("{name}: {e:?}"),
        }
        let opts = LoadOptions { non_finite: NonFiniteWeights::Propagate, ..Default::default() };
        assert!(load(tmp.path(), &opts).is_ok(), "{name}: loads on request");

        // Finite f32 values too large for f16: an overflow of the load dtype, said as such.
        let mut tensors = Tensor::read_safetensors(&file).unwrap();
        let t = &mut tensors.iter_mut().find(|(k, _)| *k == key).unwrap().1;
        let _ = t.fill_(0.01);
        let _ = t.get(0).get(1).fill_(1e6);
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let half = LoadOptions::default().with_kind(Kind::Half);
        let e = load(tmp.path(), &half).map(|_| ()).unwrap_err();
        assert!(
            matches!(&e, Error::NonFiniteWeights { overflow: Some(("float32", "float16")), .. }),
            "{name}: {e:?}"
        );
        assert!(e.to_string().contains("too large for float16"), "{e}");
        assert!(load(tmp.path(), &LoadOptions::default()).is_ok(), "{name}: fine in f32");
    }
}
