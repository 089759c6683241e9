//! The smallest complete use of amend: a model, a batch whose unwanted tokens are annotated, a
//! Targeted Negative Training loss, one AdamW step, and the metrics before and after.
//!
//! ```text
//! cargo run --example tnt_step
//! ```

use amend::losses::token::{TntConfig, TntVariant, TokenWeights, tnt_loss};
use amend::losses::{LossOutput, Reduction};
use amend::models::train::{AdamW, AdamWConfig};
use amend::models::{CausalLm, GenerationConfig, Gpt2, Gpt2Config, generate_ids};
use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

/// Learning rate of the single AdamW step.
const LR: f64 = 3e-4;

fn main() -> Result<()> {
    // Tiny tensors gain nothing from libtorch's intra-op threads, and on a busy machine its
    // OpenMP pool spins and slows everything down (docs/faq.md): use one thread.
    tch::set_num_threads(1);
    // A small random GPT-2. For a real checkpoint use `amend::models::load(dir, &LoadOptions::default())`.
    let config = Gpt2Config {
        vocab_size: 128,
        n_positions: 32,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        // No dropout, so the model and its reference agree exactly at step 0.
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        // Ten times GPT-2's initialisation scale: the random model then makes confident
        // predictions, as a trained one does.
        initializer_range: 0.2,
        ..Gpt2Config::default()
    };
    let model = Gpt2::new_random(config, 0, Kind::Float, Device::Cpu)?;
    // p°: TNT keeps the model close to a frozen copy of itself everywhere except at the
    // unwanted tokens.
    let reference = model.try_clone()?;

    // The batch: the model's own greedy continuations of two prompts, as TNT assumes (it trains
    // on the model's generations, annotated token by token). Here the annotator flags the
    // token the model repeats most; in practice it is a word list, a classifier or a human.
    let prompts = [vec![1u32, 7], vec![1, 30]];
    let gens = generate_ids(&model, &prompts, &GenerationConfig::greedy(10))?;
    let seqs: Vec<Vec<i64>> = gens
        .iter()
        .map(|g| g.prompt_ids.iter().chain(&g.token_ids).map(|&t| i64::from(t)).collect())
        .collect();
    let unwanted = most_frequent(seqs.iter().flat_map(|s| &s[2..]))?;
    println!("greedy generations: {seqs:?}; unwanted token: {unwanted}");
    let (b, len) = (seqs.len() as i64, seqs[0].len() as i64);
    let ids = Tensor::f_from_slice(&seqs.concat())?.f_reshape([b, len])?;
    // Position t predicts token t + 1: inputs drop the last token, labels the first.
    let (inputs, labels) = (ids.f_narrow(1, 0, len - 1)?, ids.f_narrow(1, 1, len - 1)?);
    // w = −1 where the label is the unwanted token, +1 elsewhere (0 would mark padding).
    let w: Vec<i64> =
        seqs.iter().flat_map(|s| &s[1..]).map(|&y| if y == unwanted { -1 } else { 1 }).collect();
    let weights = TokenWeights::new(&Tensor::f_from_slice(&w)?.f_reshape([b, len - 1])?)?;
    println!(
        "batch: {} positions, {} negative, {} positive",
        w.len(),
        weights.num_negative(),
        weights.num_positive()
    );

    // The reference logits are constants: no graph.
    let ref_logits = tch::no_grad(|| reference.forward(&inputs, None))?;
    // TNRR: reverse KL to p° without the unwanted token at w = −1, to p° at w = +1. Mean over
    // the annotated positions, so α only sets the balance between the two branches. (At this
    // first step p = p°, so the positive positions have no gradient yet.)
    let loss_cfg = TntConfig::new(TntVariant::Rr).with_alpha(100.0).with_reduction(Reduction::Mean);

    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    opt.zero_grad()?;
    let logits = model.forward(&inputs, None)?;
    let before = tnt_loss(&logits, &ref_logits, &labels, &weights, &loss_cfg)?;
    before.loss.f_backward()?;
    opt.step(LR)?;
    print_metrics("before the step", &before)?;

    let logits = tch::no_grad(|| model.forward(&inputs, None))?;
    let after = tnt_loss(&logits, &ref_logits, &labels, &weights, &loss_cfg)?;
    print_metrics("after one AdamW step", &after)?;

    let mass = |o: &LossOutput| o.metrics.mean("tnt/neg_mass").unwrap_or(f64::NAN);
    ensure!(mass(&after) < mass(&before), "the unwanted token's probability did not go down");
    Ok(())
}

fn most_frequent<'a>(tokens: impl Iterator<Item = &'a i64>) -> Result<i64> {
    let mut counts = std::collections::BTreeMap::new();
    tokens.for_each(|&t| *counts.entry(t).or_insert(0) += 1);
    let best = counts.into_iter().max_by_key(|&(t, n)| (n, std::cmp::Reverse(t)));
    best.map(|(t, _)| t).ok_or_else(|| anyhow::anyhow!("no generated tokens"))
}

fn print_metrics(title: &str, out: &LossOutput) -> Result<()> {
    println!("{title}:");
    let sum = out.weighted_sum()?.f_double_value(&[])?;
    let loss = out.loss.f_double_value(&[])?;
    println!("  loss {loss:.6} = sum {sum:.6} / {} annotated tokens", out.count());
    for (name, value) in out.metrics.to_means() {
        println!("  {name:<24} {value:.6}");
    }
    Ok(())
}
