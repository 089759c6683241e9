//! Parity with Hugging Face transformers 5.23 on tiny random models of every supported
//! architecture (fixtures from `scripts/gen_model_fixtures.py`): logits, hidden states of every
//! layer, padded batches (left and right) and greedy generations.

mod common;

use amend_models::tokenizer::{PaddingSide, pad_batch};
use amend_models::{CausalLm, GenerationConfig, LoadOptions, generate_ids, load};
use amend_testing::{BF16, Tol};
use common::{PARITY, assert_close, meta, model_dir, reference, row_ids};
use tch::Kind;

fn check_forward(name: &str, kind: Kind, tol: Tol) {
    let model = load(model_dir(name), &LoadOptions::default().with_kind(kind)).unwrap();
    let r = reference(name);
    let out = {
        let _g = tch::no_grad_guard();
        model.forward_hidden(&r["ids"], None).unwrap()
    };
    assert_close(&format!("{name} logits"), out.logits.as_ref().unwrap(), &r["logits"], tol);
    let n = model.num_layers();
    assert_eq!(out.hidden_states.len(), n + 1);
    for i in 0..n {
        assert_close(
            &format!("{name} hidden_{i}"),
            &out.hidden_states[i],
            &r[&format!("hidden_{i}")],
            tol,
        );
    }
    assert_close(
        &format!("{name} last block"),
        &out.hidden_states[n],
        &r["hidden_last_block"],
        tol,
    );
    assert_close(&format!("{name} final hidden"), &out.last_hidden_state, &r["hidden_final"], tol);
}

fn check_padding(name: &str) {
    let model = load(model_dir(name), &LoadOptions::default()).unwrap();
    let r = reference(name);
    let m = meta(name);
    let lengths: Vec<usize> =
        m["lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let seqs: Vec<Vec<u32>> =
        lengths.iter().enumerate().map(|(j, &n)| row_ids(&r["padded_ids"], j as i64, n)).collect();
    for side in [PaddingSide::Right, PaddingSide::Left] {
        let batch = pad_batch(&seqs, 0, side, tch::Device::Cpu).unwrap();
        let logits = model.forward_no_grad(&batch.input_ids, Some(&batch.attention_mask)).unwrap();
        let t = logits.size()[1];
        for (j, &n) in lengths.iter().enumerate() {
            let start = match side {
                PaddingSide::Right => 0,
                PaddingSide::Left => t - n as i64,
            };
            let got = logits.get(j as i64).narrow(0, start, n as i64).unsqueeze(0);
            assert_close(
                &format!("{name} {side:?}-padded row {j}"),
                &got,
                &r[&format!("row{j}_logits")],
                PARITY,
            );
        }
    }
}

fn check_greedy(name: &str) {
    let model = load(model_dir(name), &LoadOptions::default()).unwrap();
    let m = meta(name);
    let prompts: Vec<Vec<u32>> = m["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let want: Vec<Vec<u32>> = m["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let cfg = GenerationConfig { stop_token_ids: vec![], ..GenerationConfig::greedy(10) };
    // Both prompts in one left-padded batch with a KV cache, then one at a time.
    for batch_size in [2, 1] {
        let got = generate_ids(&model, &prompts, &GenerationConfig { batch_size, ..cfg.clone() })
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g.token_ids, w, "{name} greedy (batch {batch_size})");
            assert_eq!(g.logprobs.len(), w.len());
        }
    }
}

macro_rules! parity_tests {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;
            #[test]
            fn forward_and_hidden_states_match_transformers() {
                check_forward(stringify!($case), Kind::Float, PARITY);
            }
            #[test]
            fn padded_batches_match_unpadded_transformers() {
                check_padding(stringify!($case));
            }
            #[test]
            fn greedy_generation_matches_transformers() {
                check_greedy(stringify!($case));
            }
        }
    )*};
}

parity_tests!(
    gpt2,
    gpt2_legacy,
    gpt2_untied,
    llama,
    llama_sharded,
    llama3_rope,
    llama_linear_bias,
    mistral,
    qwen2,
    qwen2_sliding,
);

#[test]
fn gpt2_bf16_matches_transformers_bf16() {
    check_forward("gpt2_bf16", Kind::BFloat16, BF16);
}

#[test]
fn llama_bf16_matches_transformers_bf16() {
    check_forward("llama_bf16", Kind::BFloat16, BF16);
}

#[test]
fn bf16_checkpoint_loads_as_f32_exactly() {
    // Upcasting bf16 weights is exact: the f32 model's logits match the bf16 reference loosely,
    // and its parameters equal the stored bf16 values.
    let model = load(model_dir("llama_bf16"), &LoadOptions::default()).unwrap();
    assert_eq!(model.kind(), Kind::Float);
    let stored =
        tch::Tensor::read_safetensors(model_dir("llama_bf16").join("model.safetensors")).unwrap();
    for (name, t) in stored {
        let p = model.params().tensor(&name).unwrap();
        assert!(p.equal(&t.to_kind(Kind::Float)), "{name}");
    }
}
