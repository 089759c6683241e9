//! Parity with Hugging Face transformers 5.23 on tiny random models of every supported
//! architecture (fixtures from `scripts/gen_model_fixtures.py`): logits, hidden states of every
//! layer, padded batches (left and right) and greedy generations.

mod common;

use amend_models::tokenizer::{PaddingSide, pad_batch};
use amend_models::{CausalLm, GenerationConfig, LoadOptions, generate_ids, load};
use amend_testing::Tol;
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

/// bf16's unit roundoff: 8 significand bits, round to nearest, so a rounding errs by at most
/// `2^-8` relative.
const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;

/// How many bf16 roundings an error can accumulate along the path to a tensor, as a multiple of
/// the unit roundoff of the tensor's scale (`max |x|`). A pre-norm block rounds its input norm,
/// the q/k/v projections, the attention scores, the softmax, the attention output, its
/// projection and the residual sum, then the second norm, the MLP's up (and gate) projections,
/// the activation, the down projection and the second residual sum: at most 13 roundings per
/// block, plus one for the embeddings and two for the final norm and the LM head. Each rounding
/// errs by at most `u · scale` of its own output; the residual stream and the norms pass earlier
/// errors on with gain about 1 on these tiny random models, so the bound on tensor `k` (0 = the
/// embeddings) is `(1 + 13 k) · u · scale`, and the head adds 2 more. This is a first-order
/// worst-case bound: it holds on every CPU whatever order or precision its kernels accumulate in
/// (f32 or bf16 partial sums, fused or not), which is what a fixture must not depend on.
fn bf16_bound(roundings: usize, scale: f64) -> f64 {
    roundings as f64 * BF16_UNIT_ROUNDOFF * scale
}

fn max_abs(t: &tch::Tensor) -> f64 {
    common::values(t).iter().fold(0.0, |m, v| m.max(v.abs()))
}

fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    common::values(a).iter().zip(common::values(b)).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Judges amend's bf16 forward pass, and transformers' bf16 reference (committed from whichever
/// CPU generated it), against the exact answer for the same bf16 weights: amend's f32 forward
/// pass of the upcast checkpoint (upcasting is exact, and the f32 path matches transformers to
/// 1e-4 in the tests above). Both must lie within bf16 rounding of it, so the test passes on any
/// CPU and still fails for a real bf16 bug (a wrong op runs far outside the bound).
fn check_bf16_within_rounding(name: &str) {
    let exact_model = load(model_dir(name), &LoadOptions::default()).unwrap();
    let bf16_model =
        load(model_dir(name), &LoadOptions::default().with_kind(Kind::BFloat16)).unwrap();
    assert_eq!(bf16_model.kind(), Kind::BFloat16);
    let r = reference(name);
    let (exact, bf16) = {
        let _g = tch::no_grad_guard();
        (
            exact_model.forward_hidden(&r["ids"], None).unwrap(),
            bf16_model.forward_hidden(&r["ids"], None).unwrap(),
        )
    };
    let n = exact_model.num_layers();
    assert_eq!(bf16.hidden_states.len(), n + 1);
    let mut cases: Vec<(String, &tch::Tensor, &tch::Tensor, &tch::Tensor, usize)> = vec![];
    for i in 0..n {
        let what = format!("hidden_{i}");
        cases.push((
            what.clone(),
            &bf16.hidden_states[i],
            &exact.hidden_states[i],
            &r[&what],
            1 + 13 * i,
        ));
    }
    cases.push((
        "last block".into(),
        &bf16.hidden_states[n],
        &exact.hidden_states[n],
        &r["hidden_last_block"],
        1 + 13 * n,
    ));
    cases.push((
        "final hidden".into(),
        &bf16.last_hidden_state,
        &exact.last_hidden_state,
        &r["hidden_final"],
        2 + 13 * n,
    ));
    let logits = (bf16.logits.as_ref().unwrap(), exact.logits.as_ref().unwrap());
    cases.push(("logits".into(), logits.0, logits.1, &r["logits"], 3 + 13 * n));
    for (what, got, exact, transformers, roundings) in cases {
        let scale = max_abs(exact);
        let bound = bf16_bound(roundings, scale);
        let ours = max_abs_diff(got, exact);
        let theirs = max_abs_diff(transformers, exact);
        eprintln!(
            "{name} {what}: scale {scale:.3e}, bound {bound:.3e} ({roundings} u), amend bf16 {ours:.3e} ({:.2} u), transformers bf16 {theirs:.3e} ({:.2} u)",
            ours / (BF16_UNIT_ROUNDOFF * scale),
            theirs / (BF16_UNIT_ROUNDOFF * scale),
        );
        assert!(
            ours <= bound,
            "{name} {what}: amend bf16 is {ours:e} from the exact f32 answer, beyond bf16 rounding ({bound:e})"
        );
        assert!(
            theirs <= bound,
            "{name} {what}: the committed transformers bf16 reference is {theirs:e} from the exact f32 answer, beyond bf16 rounding ({bound:e}): regenerate it"
        );
    }
}

#[test]
fn gpt2_bf16_within_bf16_rounding_of_exact_and_of_transformers() {
    check_bf16_within_rounding("gpt2_bf16");
}

#[test]
fn llama_bf16_within_bf16_rounding_of_exact_and_of_transformers() {
    check_bf16_within_rounding("llama_bf16");
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
