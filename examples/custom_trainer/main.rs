//! A training loop to copy into your own trainer: batches of the model's own generations with the
//! unwanted token annotated, a TNT loss against a frozen reference plus a KL-to-reference
//! regulariser on clean text, gradient accumulation normalised exactly with `(sum, count)`,
//! gradient clipping, a cosine schedule, a JSONL metrics log and a checkpoint.
//!
//! ```text
//! cargo run --example custom_trainer              # outputs in a temporary directory
//! cargo run --example custom_trainer -- run-dir   # keep them in run-dir/
//! ```
//! (`amend::models::train::Trainer` packages the same loop if you do not need your own.)

use std::path::PathBuf;

use amend::losses::token::{RefKlConfig, TntConfig, TntVariant, TokenWeights};
use amend::losses::token::{count_active_reference_kl, reference_kl_loss, tnt_loss};
use amend::losses::{Metrics, Reduction};
use amend::models::train::{AdamW, AdamWConfig, LrSchedule, MetricsLog, ScheduleKind};
use amend::models::{CausalLm, GenerationConfig, Gpt2, Gpt2Config, LoadOptions, SaveOptions};
use anyhow::{Context, Result, ensure};
use tch::{Device, Kind, Tensor};

const BOS: u32 = 0;
const EOS: u32 = 1;
const PAD: i64 = 2;
const STEPS: usize = 12;
const ACCUM: usize = 4; // micro-batches per optimizer step
const MICRO: usize = 4; // sequences per micro-batch
const KL_WEIGHT: f64 = 0.5;

/// One micro-batch: inputs, labels, the TNT weights and the mask of real (non-pad) labels.
struct Micro {
    inputs: Tensor,
    labels: Tensor,
    weights: TokenWeights,
    mask: Tensor,
}

fn main() -> Result<()> {
    // Tiny tensors gain nothing from libtorch's intra-op threads, and on a busy machine its
    // OpenMP pool spins and slows everything down (docs/faq.md): use one thread.
    tch::set_num_threads(1);
    let out_dir = std::env::args().nth(1).map(PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let out_dir = out_dir.unwrap_or_else(|| tmp.path().to_path_buf());

    let config = Gpt2Config {
        vocab_size: 64,
        n_positions: 32,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        resid_pdrop: 0.0, // keeps p = p° at step 0; real checkpoints usually train with dropout
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        initializer_range: 0.2, // a confident random model, like a trained one
        ..Gpt2Config::default()
    };
    let mut model = Gpt2::new_random(config, 0, Kind::Float, Device::Cpu)?;
    let mut reference = model.try_clone()?; // p°, frozen
    reference.set_training(false);
    reference.params_mut().freeze_all()?;

    // Data: the model's own samples. The unwanted token is the one it generates most often.
    let sampling = GenerationConfig {
        stop_token_ids: vec![EOS],
        pad_token_id: Some(PAD as u32),
        bos_token_id: Some(BOS),
        batch_size: 64,
        ..GenerationConfig::sampling(16, 1.0, 7)
    };
    let samples = amend::models::generate_ids(&reference, &vec![vec![BOS]; 64], &sampling)?;
    let seqs: Vec<Vec<i64>> = samples
        .iter()
        .map(|g| std::iter::once(BOS).chain(g.token_ids.iter().copied()).map(i64::from).collect())
        .collect();
    let mut freq = [0usize; 64];
    seqs.iter().flatten().filter(|&&t| t > PAD).for_each(|&t| freq[t as usize] += 1);
    let unwanted = (0..64).max_by_key(|&t| freq[t]).context("empty sample")? as i64;
    let (annotated, clean): (Vec<_>, Vec<_>) =
        seqs.into_iter().partition(|s| s.contains(&unwanted));
    println!(
        "unwanted token {unwanted}: {} annotated and {} clean sequences",
        annotated.len(),
        clean.len()
    );
    let neg =
        annotated.chunks(MICRO).map(|c| micro_batch(c, unwanted)).collect::<Result<Vec<_>>>()?;
    let pos = clean.chunks(MICRO).map(|c| micro_batch(c, unwanted)).collect::<Result<Vec<_>>>()?;
    ensure!(!neg.is_empty() && !pos.is_empty(), "not enough data");

    // The reduction only shapes `out.loss`; the loop back-propagates `normalized_by` instead.
    let tnt_cfg = TntConfig::new(TntVariant::Rr).with_alpha(1.0).with_reduction(Reduction::Sum);
    let kl_cfg = RefKlConfig::default(); // forward KL(p° ‖ p) on the clean text
    let schedule = LrSchedule {
        kind: ScheduleKind::Cosine,
        peak_lr: 3e-4,
        warmup_steps: 0, // add warm-up for real runs (the first step then has lr 0)
        total_steps: STEPS,
        min_lr_ratio: 0.1,
    };
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut log = MetricsLog::create(&out_dir.join("metrics.jsonl"))?;
    model.set_training(true);
    let mut neg_mass = vec![]; // p(unwanted) per step

    for step in 0..STEPS {
        let ids: Vec<usize> = (0..ACCUM).map(|k| step * ACCUM + k).collect();
        let (negs, poss): (Vec<&Micro>, Vec<&Micro>) =
            ids.iter().map(|&i| (&neg[i % neg.len()], &pos[i % pos.len()])).unzip();
        // Exact normalisation: the counts of the whole step are known before any forward pass
        // (they depend only on annotations and masks). Each micro-batch back-propagates
        // sum / N_step, so the accumulated gradient is that of one mean over all its tokens,
        // whatever the number of tokens in each micro-batch. (With data parallelism,
        // all-reduce these counts over ranks first.)
        let n_tnt: f64 = negs.iter().map(|m| m.weights.count_active()).sum();
        let n_kl: f64 = poss
            .iter()
            .map(|m| {
                let (b, t) = (m.mask.size()[0], m.mask.size()[1]);
                count_active_reference_kl(Some(&m.mask), b, t)
            })
            .sum::<Result<f64, _>>()?;
        opt.zero_grad()?;
        let (mut metrics, mut loss) = (Metrics::new(), 0.0);
        for (n, p) in negs.iter().zip(&poss) {
            let logits = model.forward(&n.inputs, None)?;
            let ref_logits = tch::no_grad(|| reference.forward(&n.inputs, None))?;
            let tnt = tnt_loss(&logits, &ref_logits, &n.labels, &n.weights, &tnt_cfg)?;
            let logits = model.forward(&p.inputs, None)?;
            let ref_logits = tch::no_grad(|| reference.forward(&p.inputs, None))?;
            let kl = reference_kl_loss(&logits, &ref_logits, None, Some(&p.mask), &kl_cfg)?;
            let total = tnt
                .normalized_by(&[n_tnt])?
                .f_add(&kl.normalized_by(&[n_kl])?.f_mul_scalar(KL_WEIGHT)?)?;
            total.f_backward()?;
            loss += total.f_double_value(&[])?;
            metrics.merge(&tnt.metrics); // (sum, count) pairs: the merged means are exact
            metrics.merge(&kl.metrics);
        }
        let grad_norm = amend::models::train::clip_grad_norm(opt.params().map(|(_, t)| t), 1.0)?;
        ensure!(
            loss.is_finite() && grad_norm.is_finite(),
            "non-finite loss or gradient at step {step}"
        );
        let lr = schedule.lr_at(step);
        opt.step(lr)?;

        let mut record = serde_json::json!({
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tnt_tokens": n_tnt, "kl_tokens": n_kl,
        });
        for (name, value) in metrics.to_means() {
            record[name.as_str()] = value.into();
        }
        log.write(&record)?;
        let m = |k: &str| metrics.mean(k).unwrap_or(f64::NAN);
        neg_mass.push(m("tnt/neg_mass"));
        println!(
            "step {step:2}  lr {lr:.2e}  loss {loss:.4}  |g| {grad_norm:6.3}  \
             p(unwanted) {:.4}  pos KL {:.4}  clean KL {:.4}",
            m("tnt/neg_mass"),
            m("tnt/pos_kl"),
            m("kl")
        );
    }

    ensure!(neg_mass.last() < neg_mass.first(), "p(unwanted) did not go down: {neg_mass:?}");

    // Checkpoint: a Hugging Face directory (transformers loads it) plus the optimizer state.
    let ckpt = model.save_pretrained(&out_dir.join("checkpoint-final"), &SaveOptions::default())?;
    opt.save(&ckpt.join("optimizer.safetensors"))?;
    let reloaded = Gpt2::load(&ckpt, &LoadOptions::default())?;
    let probe = &neg[0].inputs;
    let diff = tch::no_grad(|| -> Result<f64> {
        let d = model.forward(probe, None)?.f_sub(&reloaded.forward(probe, None)?)?;
        Ok(d.f_abs()?.f_max()?.f_double_value(&[])?)
    })?;
    println!("checkpoint {} reloads with max |Δlogit| = {diff:.1e}", ckpt.display());
    ensure!(diff == 0.0, "the reloaded checkpoint gives different logits");
    println!("metrics log {}", out_dir.join("metrics.jsonl").display());
    Ok(())
}

/// Right-pads sequences and annotates them: w = −1 where the label is the unwanted token, +1 on
/// other real tokens, 0 on padding.
fn micro_batch(seqs: &[Vec<i64>], unwanted: i64) -> Result<Micro> {
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut real) = (vec![], vec![]);
    for s in seqs {
        ids.extend(s.iter().copied().chain(std::iter::repeat_n(PAD, width - s.len())));
        real.extend((0..width).map(|t| t < s.len())); // from lengths, never from token values
    }
    let shape = [seqs.len() as i64, width as i64];
    let ids = Tensor::f_from_slice(&ids)?.f_reshape(shape)?;
    let real = Tensor::f_from_slice(&real)?.f_reshape(shape)?;
    // Position t predicts token t + 1. Right padding needs no attention mask in a causal model:
    // real tokens never attend to the padding after them.
    let t = width as i64 - 1;
    let (inputs, labels, mask) =
        (ids.f_narrow(1, 0, t)?, ids.f_narrow(1, 1, t)?, real.f_narrow(1, 1, t)?);
    let w = mask.f_to_kind(Kind::Int64)?.f_where_scalarother(&labels.f_ne(unwanted)?, -1)?;
    let w = w.f_where_scalarother(&mask, 0)?;
    Ok(Micro { inputs, labels, weights: TokenWeights::new(&w)?, mask })
}
