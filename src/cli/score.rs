//! `amend score`: per-token log-probabilities and perplexity of text under a model.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::json;

use amend::models::{CausalLm, ScoreOptions, TokenScores, parse_kind};

/// Score text with a model: the log-probability of every token given the tokens before it, and
/// the perplexity.
///
/// The first token of a text has nothing to be predicted from: models whose tokenizer adds a BOS
/// token (Llama, amend's tiny models) score every word; for GPT-2 pass --prepend-bos to score the
/// first word after <|endoftext|>. Prints one line per token (position, token, log-prob) and a
/// summary per text, or everything as JSON with --json.
///
/// A text longer than the model's context (config.json `n_positions` for GPT-2,
/// `max_position_embeddings` for Llama-family models) is refused before anything runs, naming the
/// text, its length and the context. Choose what to do with long texts: --max-tokens N scores only
/// the first N tokens of each text; --stride S scores all of it in overlapping windows of the
/// context (or of --max-tokens) tokens that move by S tokens, each token given at least
/// window − S tokens of context. A progress bar is drawn on stderr when it is a terminal.
///
/// Example: amend score --model ./gpt2 --text "The cat sat on the mat." --prepend-bos
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A text to score (repeat for several).
    #[arg(long, value_name = "T", required_unless_present = "file", conflicts_with = "file")]
    pub text: Vec<String>,
    /// A UTF-8 file to score: the whole file is one text (see --lines).
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,
    /// With --file: score every non-empty line as its own text.
    #[arg(long, requires = "file")]
    pub lines: bool,
    /// Put the BOS token (GPT-2: <|endoftext|>) before each text so its first token is scored.
    #[arg(long)]
    pub prepend_bos: bool,
    /// Do not apply the tokenizer's special-token post-processing (e.g. Llama's BOS).
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Parameter dtype: f32, bf16, f16 or f64.
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: String,
    /// Texts (or windows) per forward pass.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub batch_size: usize,
    /// Score only the first N tokens of each longer text (with --stride: the window length).
    /// Above the context it is refused for GPT-2 and extrapolates for RoPE models.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: Option<u64>,
    /// Score long texts whole, in windows of the context (or --max-tokens) moved by S tokens
    /// (S < window; smaller S: more context per token, more work).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub stride: Option<u64>,
    #[command(flatten)]
    pub threads: super::ThreadsArgs,
    #[command(flatten)]
    pub load: super::LoadArgs,
}

/// Runs `amend score`.
pub fn run(args: &ScoreArgs) -> Result<()> {
    args.threads.apply();
    let kind =
        parse_kind(&args.dtype).with_context(|| format!("unknown --dtype `{}`", args.dtype))?;
    // The texts, and how to name each in messages.
    let (texts, names): (Vec<String>, Vec<String>) = match &args.file {
        Some(f) => {
            let s = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if args.lines {
                s.lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                    .map(|(n, l)| (l.to_string(), format!("line {} of {}", n + 1, f.display())))
                    .unzip()
            } else {
                (vec![s], vec![format!("the text of {}", f.display())])
            }
        }
        None => {
            let n = args.text.len();
            let names = (1..=n)
                .map(|i| if n == 1 { "--text".into() } else { format!("--text number {i}") })
                .collect();
            (args.text.clone(), names)
        }
    };
    if texts.is_empty() {
        bail!("nothing to score");
    }
    let opts = args.load.options(kind);
    let model = amend::models::load(&args.model, &opts)
        .with_context(|| format!("cannot load a model from {}", args.model.display()))?;
    let tok = model.tokenizer().context("the model directory has no tokenizer.json")?;
    let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let sopts = ScoreOptions {
        add_special_tokens: !args.no_special_tokens,
        prepend_bos: args.prepend_bos,
        batch_size: args.batch_size.max(1),
        max_tokens: args.max_tokens.map(to_usize),
        stride: args.stride.map(to_usize),
        progress: true,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let scores = match amend::models::score_texts(&model, &refs, &sopts) {
        Ok(s) => s,
        Err(amend::models::Error::TooLong { index, tokens, context, field, .. }) => {
            let config = args.model.join("config.json");
            let what = &names[index];
            let fix = if args.max_tokens.is_some_and(|n| n > context as u64) {
                format!("give a --max-tokens of at most {context}")
            } else {
                format!(
                    "pass --max-tokens N to score only the first N tokens of each text, or \
                     --stride S to score all of it in overlapping windows of {context} tokens"
                )
            };
            bail!(
                "{what} has {tokens} tokens, more than the model's context of {context} tokens \
                 (`{field}` in {}); nothing was scored: {fix}",
                config.display()
            );
        }
        Err(amend::models::Error::NothingToScore { index, tokens, with_bos, .. }) => {
            let what = &names[index];
            let bos = if with_bos { " (with the --prepend-bos token)" } else { "" };
            bail!(
                "{what} has {tokens} token{}{bos}: nothing to score, a text needs at least two \
                 tokens (the first is only context); nothing was scored",
                if tokens == 1 { "" } else { "s" }
            );
        }
        Err(amend::models::Error::InvalidInput {
            name: name @ ("stride" | "max_tokens"),
            reason,
            ..
        }) => bail!("--{}: {reason}", name.replace('_', "-")),
        Err(e) => return Err(e.into()),
    };
    let overall = amend::models::corpus_perplexity(&scores);
    let total: usize = scores.iter().map(TokenScores::count).sum();
    let piece = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
    if args.json {
        let items: Vec<_> = texts
            .iter()
            .zip(&scores)
            .map(|(text, s)| {
                let tokens: Vec<_> = s
                    .token_ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| {
                        let lp = i.checked_sub(s.first_scored).map(|j| s.logprobs[j]);
                        json!({ "id": id, "token": tok.id_to_token(id), "text": piece(id), "logprob": lp })
                    })
                    .collect();
                json!({
                    "text": text,
                    "tokens": tokens,
                    "truncated_tokens": s.truncated,
                    "num_scored": s.count(),
                    "sum_logprob": s.sum_logprob(),
                    "mean_nll": s.mean_nll(),
                    "perplexity": s.perplexity(),
                })
            })
            .collect();
        let out = json!({
            "model": args.model,
            "texts": items,
            "num_scored": total,
            "perplexity": overall,
        });
        return emit(&format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    let mut out = String::new();
    for (n, s) in scores.iter().enumerate() {
        let cut = if s.truncated > 0 {
            format!(" (the last {} cut by --max-tokens)", s.truncated)
        } else {
            String::new()
        };
        out +=
            &format!("text {}: {} tokens{cut}, {} scored\n", n + 1, s.token_ids.len(), s.count());
        for (i, &id) in s.token_ids.iter().enumerate() {
            let shown = format!("{:?}", piece(id));
            out += &match i.checked_sub(s.first_scored) {
                Some(j) => format!("{i:>6}  {shown:<24} {:>10.4}\n", s.logprobs[j]),
                None => format!("{i:>6}  {shown:<24} {:>10}\n", "-"),
            };
        }
        out += &format!(
            "sum logprob {:.4}   mean nll {:.4}   perplexity {:.4}\n\n",
            s.sum_logprob(),
            s.mean_nll(),
            s.perplexity()
        );
    }
    if scores.len() > 1 {
        out += &format!("all texts: {total} scored tokens, perplexity {overall:.4}\n");
    }
    emit(&out)
}

/// Writes `text` to stdout; a closed pipe (`amend score … | head`) is not an error.
pub(crate) fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
