//! `amend generate`: continue prompts with a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use amend::models::{CausalLm, FinishReason, parse_kind};

use super::score::emit;

/// Continue prompts with a model (greedy or sampled, with a KV cache).
///
/// Settings start from the checkpoint's generation_config.json (greedy when it has none) and
/// are overridden by the flags: --greedy forces greedy decoding; --sample, or any of
/// --temperature, --top-k, --top-p, turns sampling on. Sampling is reproducible: the same --seed
/// gives the same text. Generation stops at the model's end-of-sequence tokens (see
/// --stop-token and --no-stop) or after --max-new-tokens.
///
/// Example: amend generate --model ./tiny --prompt "the cat" --temperature 0.8 --top-p 0.95 --seed 1
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A prompt (repeat for several; they are decoded together in left-padded batches).
    #[arg(long, value_name = "P", required = true)]
    pub prompt: Vec<String>,
    /// Tokens to generate at most per prompt [default: the generation config's, else 32].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Greedy decoding (overrides the generation config and the sampling flags).
    #[arg(long, conflicts_with = "sample")]
    pub greedy: bool,
    /// Sample from the model's distribution.
    #[arg(long)]
    pub sample: bool,
    /// Softmax temperature (> 0); implies sampling.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    /// Sample only from the K most likely tokens (0 disables); implies sampling.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens with probability ≥ P; implies sampling.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this token id (repeatable; replaces the model's end-of-sequence ids).
    #[arg(long, value_name = "ID", conflicts_with = "no_stop")]
    pub stop_token: Vec<u32>,
    /// Ignore end-of-sequence tokens: always generate --max-new-tokens.
    #[arg(long)]
    pub no_stop: bool,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
    /// Print JSON (ids, per-token log-probs, finish reasons) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Parameter dtype: f32, bf16, f16 or f64.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    #[command(flatten)]
    pub threads: super::ThreadsArgs,
    #[command(flatten)]
    pub load: super::LoadArgs,
}

/// Runs `amend generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    args.threads.apply();
    let kind =
        parse_kind(&args.dtype).with_context(|| format!("unknown --dtype `{}`", args.dtype))?;
    let opts = args.load.options(kind);
    let model = amend::models::load(&args.model, &opts)
        .with_context(|| format!("cannot load a model from {}", args.model.display()))?;
    let mut cfg = model.generation_config();
    if let Some(n) = args.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    if let Some(t) = args.temperature {
        cfg.temperature = t;
    }
    if let Some(k) = args.top_k {
        cfg.top_k = (k > 0).then_some(k);
    }
    if let Some(p) = args.top_p {
        cfg.top_p = Some(p);
    }
    if args.sample || args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some() {
        cfg.do_sample = true;
    }
    if args.greedy {
        cfg.do_sample = false;
    }
    if args.no_stop {
        cfg.stop_token_ids.clear();
    } else if !args.stop_token.is_empty() {
        cfg.stop_token_ids = args.stop_token.clone();
    }
    cfg.seed = args.seed;
    cfg.batch_size = args.batch_size.max(1);
    let prompts: Vec<&str> = args.prompt.iter().map(String::as_str).collect();
    let gens = amend::models::generate(&model, &prompts, &cfg)?;
    if args.json {
        let items: Vec<_> = args
            .prompt
            .iter()
            .zip(&gens)
            .map(|(p, g)| {
                json!({
                    "prompt": p,
                    "text": g.text,
                    "prompt_ids": g.prompt_ids,
                    "token_ids": g.token_ids,
                    "logprobs": g.logprobs,
                    "finish_reason": g.finish_reason,
                })
            })
            .collect();
        let out = json!({ "model": args.model, "config": cfg, "generations": items });
        return emit(&format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    let mut out = String::new();
    for (p, g) in args.prompt.iter().zip(&gens) {
        let why = match g.finish_reason {
            FinishReason::Stop => "stop token",
            FinishReason::Length => "max tokens",
        };
        out += &format!(
            "--- {} new tokens ({why})\n{p}{}\n",
            g.token_ids.len(),
            g.text.as_deref().unwrap_or("")
        );
    }
    emit(&out)
}
