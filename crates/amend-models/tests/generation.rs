//! Generation and scoring: KV cache equals full recomputation, seeded sampling is reproducible
//! and independent of batching, stop tokens, top-k = 1 is greedy, scores equal log-softmax.

mod common;

use amend_models::{
    CausalLm, FinishReason, ForwardOptions, GenerationConfig, LoadOptions, ScoreOptions,
    corpus_perplexity, generate, generate_ids, load, score_continuations, score_ids, score_texts,
};
use amend_testing::Tol;
use common::{PARITY, assert_close, model_dir, reference, row_ids};
use tch::{Kind, Tensor};

const PROMPTS: [&[u32]; 3] = [&[5, 17, 40, 3], &[99], &[12, 250, 7, 7, 31, 2]];

fn prompts() -> Vec<Vec<u32>> {
    PROMPTS.iter().map(|p| p.to_vec()).collect()
}

#[test]
fn kv_cache_steps_equal_the_full_forward() {
    for name in ["gpt2", "mistral", "qwen2_sliding", "llama3_rope"] {
        let model = load(model_dir(name), &LoadOptions::default()).unwrap();
        let ids = &reference(name)["ids"];
        let full = model.forward_no_grad(ids, None).unwrap();
        let _g = tch::no_grad_guard();
        let mut cache = model.new_kv_cache(2, 12).unwrap();
        // 5 tokens at once, then one at a time.
        let mut parts = vec![
            model
                .forward_with(
                    &ids.narrow(1, 0, 5),
                    None,
                    Some(&mut cache),
                    ForwardOptions::logits(),
                )
                .unwrap()
                .logits
                .unwrap(),
        ];
        for t in 5..12 {
            parts.push(
                model
                    .forward_with(
                        &ids.narrow(1, t, 1),
                        None,
                        Some(&mut cache),
                        ForwardOptions::logits(),
                    )
                    .unwrap()
                    .logits
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 12);
        assert_close(&format!("{name} cached"), &Tensor::cat(&parts, 1), &full, PARITY);
    }
}

#[test]
fn generated_logprobs_equal_scores_of_the_generated_text() {
    let model = load(model_dir("llama"), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig { stop_token_ids: vec![], ..GenerationConfig::sampling(8, 1.3, 3) };
    let gens = generate_ids(&model, &prompts(), &cfg).unwrap();
    let seqs: Vec<Vec<u32>> =
        gens.iter().map(|g| [g.prompt_ids.clone(), g.token_ids.clone()].concat()).collect();
    let starts: Vec<usize> = gens.iter().map(|g| g.prompt_ids.len()).collect();
    let scores = score_ids(&model, &seqs, &starts, 2).unwrap();
    for (g, s) in gens.iter().zip(&scores) {
        assert_eq!(s.scored_ids(), &g.token_ids[..]);
        let got: Vec<f64> = g.logprobs.iter().map(|&x| f64::from(x)).collect();
        let want: Vec<f64> = s.logprobs.iter().map(|&x| f64::from(x)).collect();
        Tol { rel: 1e-4, abs: 1e-5 }.assert_all_close("logprobs", &got, &want);
    }
}

#[test]
fn sampling_is_seeded_and_independent_of_batch_size() {
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let cfg = GenerationConfig {
        stop_token_ids: vec![],
        top_k: Some(40),
        top_p: Some(0.95),
        ..GenerationConfig::sampling(10, 1.5, 11)
    };
    let a = generate_ids(&model, &prompts(), &cfg).unwrap();
    let b = generate_ids(&model, &prompts(), &GenerationConfig { batch_size: 1, ..cfg.clone() })
        .unwrap();
    let c =
        generate_ids(&model, &prompts(), &GenerationConfig { seed: 12, ..cfg.clone() }).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.token_ids, y.token_ids);
        assert_eq!(x.token_ids.len(), 10);
        assert_eq!(x.finish_reason, FinishReason::Length);
    }
    assert!(
        a.iter().zip(&c).any(|(x, z)| x.token_ids != z.token_ids),
        "another seed gives other samples"
    );
    // top_k = 1 sampling is greedy.
    let greedy = generate_ids(
        &model,
        &prompts(),
        &GenerationConfig { stop_token_ids: vec![], ..GenerationConfig::greedy(10) },
    )
    .unwrap();
    let k1 =
        generate_ids(&model, &prompts(), &GenerationConfig { top_k: Some(1), top_p: None, ..cfg })
            .unwrap();
    for (g, k) in greedy.iter().zip(&k1) {
        assert_eq!(g.token_ids, k.token_ids);
    }
}

#[test]
fn stop_tokens_end_rows_independently() {
    let model = load(model_dir("qwen2"), &LoadOptions::default()).unwrap();
    let free = GenerationConfig { stop_token_ids: vec![], ..GenerationConfig::greedy(6) };
    let base = generate_ids(&model, &prompts(), &free).unwrap();
    // Stop on the third token generated for prompt 0.
    let stop = base[0].token_ids[2];
    let cfg = GenerationConfig { stop_token_ids: vec![stop], ..free };
    let got = generate_ids(&model, &prompts(), &cfg).unwrap();
    let first = base[0].token_ids.iter().position(|&t| t == stop).unwrap();
    assert_eq!(got[0].token_ids, base[0].token_ids[..=first].to_vec());
    assert_eq!(got[0].finish_reason, FinishReason::Stop);
    for (g, b) in got.iter().zip(&base).skip(1) {
        match b.token_ids.iter().position(|&t| t == stop) {
            Some(i) => assert_eq!(g.token_ids, b.token_ids[..=i].to_vec()),
            None => assert_eq!(g.token_ids, b.token_ids),
        }
    }
    // Text prompts go through the tokenizer, and the stop token is not part of the text.
    let gens = generate(&model, &["the quick", ""], &GenerationConfig::greedy(4)).unwrap();
    assert_eq!(gens[1].prompt_ids, vec![0], "an empty prompt becomes the BOS token");
    assert!(gens.iter().all(|g| g.text.is_some()));
}

#[test]
fn scores_are_log_softmax_of_the_reference_logits() {
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let r = reference("gpt2");
    let seqs: Vec<Vec<u32>> = (0..2).map(|i| row_ids(&r["ids"], i, 12)).collect();
    let scores = score_ids(&model, &seqs, &[1, 4], 1).unwrap();
    let logp = r["logits"].log_softmax(-1, Kind::Double);
    for (i, s) in scores.iter().enumerate() {
        let want: Vec<f64> = (s.first_scored..12)
            .map(|t| logp.double_value(&[i as i64, t as i64 - 1, i64::from(seqs[i][t])]))
            .collect();
        let got: Vec<f64> = s.logprobs.iter().map(|&x| f64::from(x)).collect();
        PARITY.assert_all_close("score", &got, &want);
    }
    assert_eq!(scores[1].count(), 8);
    // Batching with right padding does not change scores.
    let batched = score_ids(&model, &[seqs[0][..5].to_vec(), seqs[1].clone()], &[1, 1], 2).unwrap();
    let alone = score_ids(&model, &[seqs[0][..5].to_vec()], &[1], 1).unwrap();
    Tol { rel: 1e-5, abs: 1e-6 }.assert_all_close(
        "batched",
        &batched[0].logprobs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        &alone[0].logprobs.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
    );
}

#[test]
fn text_scoring_and_continuations() {
    let model = load(model_dir("gpt2"), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let texts = ["the quick brown fox", "hidden states flow"];
    let plain = score_texts(&model, &texts, &ScoreOptions::default()).unwrap();
    assert_eq!(plain[0].token_ids, tok.encode(texts[0], true).unwrap());
    assert_eq!(plain[0].count(), plain[0].token_ids.len() - 1);
    let with_bos =
        score_texts(&model, &texts, &ScoreOptions { prepend_bos: true, ..Default::default() })
            .unwrap();
    assert_eq!(with_bos[0].token_ids[0], 0);
    assert_eq!(with_bos[0].count(), plain[0].count() + 1);
    let ppl = corpus_perplexity(&plain);
    assert!(ppl.is_finite() && ppl > 1.0);
    let cont =
        score_continuations(&model, &[("the quick", " brown fox")], &ScoreOptions::default())
            .unwrap();
    assert_eq!(cont[0].first_scored, tok.encode("the quick", true).unwrap().len());
    assert_eq!(cont[0].scored_ids(), &tok.encode(" brown fox", false).unwrap()[..]);
}
