//! The tiny-model recipe: deterministic, learns its corpus, caches by hash, saves a directory
//! transformers can load.

mod common;

use amend_models::recipe::{
    RunOptions, TinyRecipe, TokenizerRecipe, cache_path, load_or_train, recipe_hash,
    synthetic_corpus, train_bpe_tokenizer, train_tiny_model,
};
use amend_models::{CausalLm, GenerationConfig, ScoreOptions, generate, score_texts};

#[test]
fn bpe_tokenizer_round_trips_and_adds_bos() {
    common::setup();
    let corpus = synthetic_corpus(200, 3);
    let (tok, files) =
        train_bpe_tokenizer(&corpus, &TokenizerRecipe { vocab_size: 320, min_frequency: 2 }, 64)
            .unwrap();
    assert!(tok.vocab_size() <= 320 && tok.vocab_size() > 257, "{}", tok.vocab_size());
    let text = "the quick fox sleeps near the old river.";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids[0], tok.bos_token_id().unwrap());
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert!(tok.encode(text, false).unwrap().len() + 1 == ids.len());
    // Frequent words become single tokens.
    assert_eq!(tok.encode(" the", false).unwrap().len(), 1);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["tokenizer.json", "tokenizer_config.json"]);
}

#[test]
fn quick_recipe_is_deterministic_and_learns() {
    common::setup();
    let corpus = synthetic_corpus(400, 11);
    let recipe = TinyRecipe::quick();
    let (a, ra) = train_tiny_model(&corpus, &recipe, &RunOptions::default()).unwrap();
    let (b, rb) = train_tiny_model(&corpus, &recipe, &RunOptions::default()).unwrap();
    assert_eq!(ra.hash, rb.hash);
    assert_eq!(ra.train_loss, rb.train_loss);
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b.named_parameters()) {
        assert!(x.equal(&y), "{n} differs between identical runs");
    }
    // Far better than a uniform guess over the vocabulary.
    let ppl = ra.eval_perplexity.unwrap();
    assert!(
        ppl < ra.vocab_size as f64 / 20.0,
        "eval perplexity {ppl} vs vocabulary {}",
        ra.vocab_size
    );
    assert!(ra.train_loss < 2.5, "train loss {}", ra.train_loss);
    assert!(ra.documents.1 > 0 && ra.tokens_seen > 0);
    // Scoring and generation work on the trained model: a corpus-like sentence is more likely
    // than the same words shuffled.
    let s = score_texts(
        &a,
        &["the small cat sees the dog today.", "dog the today sees cat small the."],
        &ScoreOptions::default(),
    )
    .unwrap();
    assert_eq!(s[0].first_scored, 1);
    assert!(s[0].mean_nll() < s[1].mean_nll(), "{} vs {}", s[0].mean_nll(), s[1].mean_nll());
    let g = generate(&a, &["the"], &GenerationConfig::greedy(8)).unwrap();
    assert!(!g[0].text.as_deref().unwrap_or("").trim().is_empty());
}

#[test]
fn recipe_hash_tracks_recipe_and_corpus() {
    common::setup();
    let corpus = synthetic_corpus(10, 0);
    let r = TinyRecipe::quick();
    let h = recipe_hash(&corpus, &r);
    assert_eq!(h.len(), 64);
    assert_eq!(h, recipe_hash(&corpus, &r.clone()));
    let mut r2 = r.clone();
    r2.train.lr *= 2.0;
    assert_ne!(h, recipe_hash(&corpus, &r2));
    assert_ne!(h, recipe_hash(&synthetic_corpus(10, 1), &r));
    // Document boundaries matter.
    let joined = vec![corpus[..2].concat()];
    assert_ne!(recipe_hash(&joined, &r), recipe_hash(&corpus[..2], &r));
}

#[test]
fn load_or_train_caches_by_hash() {
    common::setup();
    let corpus = synthetic_corpus(120, 5);
    let mut recipe = TinyRecipe::quick();
    recipe.train.steps = 10;
    let cache = tempfile::tempdir().unwrap();
    let (a, ra, dir) =
        load_or_train(cache.path(), &corpus, &recipe, &RunOptions::default()).unwrap();
    assert_eq!(dir, cache_path(cache.path(), &corpus, &recipe));
    assert!(dir.join("config.json").is_file() && dir.join("tokenizer.json").is_file());
    let t0 = std::time::Instant::now();
    let (b, rb, _) = load_or_train(cache.path(), &corpus, &recipe, &RunOptions::default()).unwrap();
    assert_eq!(ra, rb);
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b.named_parameters()) {
        assert!(x.equal(&y), "{n}");
    }
    assert!(t0.elapsed().as_secs_f64() < 5.0);
    // The reloaded tokenizer behaves like the trained one.
    let (ta, tb) = (a.tokenizer().unwrap(), b.tokenizer().unwrap());
    assert_eq!(
        ta.encode("a red boat waits.", true).unwrap(),
        tb.encode("a red boat waits.", true).unwrap()
    );
    assert_eq!(tb.bos_token_id(), ta.bos_token_id());
    assert_eq!(tb.eos_token_ids(), ta.eos_token_ids());
}

#[test]
#[ignore = "needs the cache venv's python with transformers; run with --ignored"]
fn transformers_loads_the_tiny_model_and_tokenizer() {
    common::setup();
    let python = std::env::var("AMEND_TORCH_PYTHON").expect("AMEND_TORCH_PYTHON");
    let corpus = synthetic_corpus(120, 5);
    let mut recipe = TinyRecipe::quick();
    recipe.train.steps = 10;
    let cache = tempfile::tempdir().unwrap();
    let (model, _, dir) =
        load_or_train(cache.path(), &corpus, &recipe, &RunOptions::default()).unwrap();
    let text = "where is the lamp? the lamp is under the table.";
    let ids: Vec<i64> =
        model.tokenizer().unwrap().encode(text, true).unwrap().iter().map(|&x| x as i64).collect();
    let t = tch::Tensor::from_slice(&ids).view([1, ids.len() as i64]);
    let logits = model.forward_no_grad(&t, None).unwrap();
    let rust = cache.path().join("rust.safetensors");
    tch::Tensor::write_safetensors(&[("ids", &t), ("logits", &logits)], &rust).unwrap();
    let script = format!(
        "import sys, torch\nfrom transformers import AutoTokenizer\nt = AutoTokenizer.from_pretrained(sys.argv[1])\n\
         ids = t({text:?})['input_ids']\nassert ids == {ids:?}, (ids, {ids:?})\nprint('tokenizer ok')\n"
    );
    let st = std::process::Command::new(&python).arg("-c").arg(&script).arg(&dir).status().unwrap();
    assert!(st.success(), "transformers tokenizer disagrees");
    let check =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_saved_model.py");
    let st = std::process::Command::new(&python)
        .arg(check)
        .arg(&dir)
        .arg(&dir)
        .arg(&rust)
        .status()
        .unwrap();
    assert!(st.success(), "transformers model check failed");
}
