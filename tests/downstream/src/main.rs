//! One TNT training step on a small random GPT-2, written against amend's public API only.

use amend::losses::token::{TntConfig, TntVariant, TokenWeights, tnt_loss};
use amend::models::train::{AdamW, AdamWConfig};
use amend::models::{CausalLm, Gpt2, Gpt2Config};
use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    tch::manual_seed(0);
    let cfg = Gpt2Config {
        vocab_size: 64,
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        ..Gpt2Config::default()
    };
    let mut model = Gpt2::new_random(cfg, 0, Kind::Float, Device::Cpu)?;
    let reference = model.try_clone()?; // frozen copy: p° of targeted negative training
    model.set_training(false);

    // One batch of 2 sequences of 8 tokens; token 5 of sequence 0 is unwanted.
    let ids = Tensor::from_slice(&[1i64, 7, 9, 3, 12, 40, 2, 8, 4, 4, 11, 30, 6, 6, 1, 9])
        .reshape([2, 8]);
    let inputs = ids.narrow(1, 0, 7);
    let labels = ids.narrow(1, 1, 7);
    let mut w = vec![1i64; 14];
    w[4] = -1;
    let weights = TokenWeights::new(&Tensor::from_slice(&w).reshape([2, 7]))?;

    let ref_logits = tch::no_grad(|| reference.forward(&inputs, None))?;
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let loss_cfg = TntConfig::new(TntVariant::Ff).with_alpha(1.0);

    let mut losses = vec![];
    for step in 0..3 {
        opt.zero_grad()?;
        let logits = model.forward(&inputs, None)?;
        let out = tnt_loss(&logits, &ref_logits, &labels, &weights, &loss_cfg)?;
        out.loss.f_backward()?;
        opt.step(1e-2)?;
        let loss = out.loss.f_double_value(&[])?;
        let neg_mass = out.metrics.mean("tnt/neg_mass").unwrap_or(f64::NAN);
        println!("step {step}: TNFF loss {loss:.5}, probability of the unwanted token {neg_mass:.5}");
        losses.push((loss, neg_mass));
    }
    ensure!(losses.iter().all(|(l, m)| l.is_finite() && m.is_finite()), "non-finite values");
    ensure!(losses[2].1 < losses[0].1, "the unwanted token's probability did not go down");
    println!("downstream check passed");
    Ok(())
}
