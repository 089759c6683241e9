//! DPO, SimPO, NPO, RRHF and NEAT on the same candidate set: four scored responses to one
//! prompt, scored by a small policy and its frozen reference. Each method trains a fresh copy of
//! the policy for a few steps; the example prints its loss, its TRL-named metrics and how the
//! log-probability of each candidate moved.
//!
//! ```text
//! cargo run --example preference_pair
//! ```

use amend::losses::LossOutput;
use amend::losses::sequence::{
    CandidateSet, DpoConfig, NeatConfig, NpoConfig, Origin, RrhfConfig, SeqLogps, SeqLogpsConfig,
    SimPoConfig, dpo_loss, neat_loss, npo_loss, rrhf_loss, seq_logps, simpo_loss,
};
use amend::models::train::{AdamW, AdamWConfig};
use amend::models::{CausalLm, Gpt2, Gpt2Config};
use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

const PAD: i64 = 0;
const PROMPT: [i64; 4] = [1, 10, 11, 12];
/// Four responses to the prompt with the rewards a reward model gave them. Response 3 is the
/// unwanted one: it was sampled under a negative prompt (say, "answer rudely"), and the reward
/// model failed to rank it last.
const RESPONSES: [&[i64]; 4] = [&[20, 21, 22, 2], &[20, 23, 2], &[24, 25, 26, 27, 2], &[30, 31, 2]];
const REWARDS: [f32; 4] = [1.0, 0.5, 0.2, 0.3];
/// The preference pair used by DPO and SimPO (best ≻ unwanted), and the response NPO forgets.
const CHOSEN: i64 = 0;
const REJECTED: i64 = 3;
const STEPS: usize = 20;
const LR: f64 = 3e-3;

/// The K candidates as one right-padded batch: prompt ⊕ response, with the response marked.
struct Batch {
    ids: Tensor,
    attention: Tensor,
    completion: Tensor,
}

type Objective<'a> = Box<dyn Fn(&SeqLogps) -> Result<LossOutput> + 'a>;

fn main() -> Result<()> {
    // Tiny tensors gain nothing from libtorch's intra-op threads, and on a busy machine its
    // OpenMP pool spins and slows everything down (docs/faq.md): use one thread.
    tch::set_num_threads(1);
    let config = Gpt2Config {
        vocab_size: 64,
        n_positions: 16,
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        resid_pdrop: 0.0,
        embd_pdrop: 0.0,
        attn_pdrop: 0.0,
        ..Gpt2Config::default()
    };
    let reference = Gpt2::new_random(config, 0, Kind::Float, Device::Cpu)?;
    let batch = candidate_batch()?;
    // R: the reference's summed response log-probs, constants for every loss.
    let ref_lp = tch::no_grad(|| logps(&reference, &batch))?;
    let r = ref_lp.sum.shallow_clone();
    println!("reference log p(response): {}", fmt(&r)?);
    println!("rewards                  : {REWARDS:?}\n");

    let pair = |lp: &SeqLogps| -> Result<(SeqLogps, SeqLogps)> {
        Ok((lp.f_narrow(CHOSEN, 1)?, lp.f_narrow(REJECTED, 1)?))
    };
    let rewards = Tensor::f_from_slice(&REWARDS)?.f_reshape([1, 4])?;
    let methods: Vec<(&str, Objective)> = vec![
        (
            "DPO (sigmoid, β = 0.1; pair 0 ≻ 3, reference model)",
            Box::new(|lp| {
                let (c, rj) = pair(lp)?;
                let (rc, rr) = (r.f_narrow(0, CHOSEN, 1)?, r.f_narrow(0, REJECTED, 1)?);
                Ok(dpo_loss(&c, &rj, &rc, &rr, &DpoConfig::default())?)
            }),
        ),
        (
            "SimPO (β = 2, γ = 0.5; pair 0 ≻ 3, no reference)",
            Box::new(|lp| {
                let (c, rj) = pair(lp)?;
                Ok(simpo_loss(&c, &rj, &SimPoConfig::default())?)
            }),
        ),
        (
            "NPO (β = 0.1; forget response 3, reference model)",
            Box::new(|lp| {
                let forget = lp.f_narrow(REJECTED, 1)?;
                Ok(npo_loss(&forget, &r.f_narrow(0, REJECTED, 1)?, None, &NpoConfig::default())?)
            }),
        ),
        (
            "RRHF (λ = 1; the 4 candidates ranked by their rewards, SFT on the best)",
            Box::new(|lp| {
                let cands = CandidateSet::from_logps(lp, &rewards)?;
                Ok(rrhf_loss(&cands, &RrhfConfig::default())?)
            }),
        ),
        (
            "NEAT (RRHF, but candidate 3 came from a negative prompt: ranked below all others)",
            Box::new(|lp| {
                use Origin::{Dataset, NegPrompt, Policy};
                let cands = CandidateSet::from_logps(lp, &rewards)?
                    .with_origins(&[Dataset, Dataset, Policy, NegPrompt])?;
                Ok(neat_loss(&cands, &NeatConfig::default())?)
            }),
        ),
    ];

    let mut summary = vec![];
    for (name, objective) in &methods {
        println!("{name}");
        // Every method starts from the same policy: a copy of the reference.
        let policy = reference.try_clone()?;
        let mut opt = AdamW::new(policy.params(), AdamWConfig::default())?;
        let mut last = None;
        for step in 0..STEPS {
            opt.zero_grad()?;
            let out = objective(&logps(&policy, &batch)?)?;
            out.loss.f_backward()?;
            opt.step(LR)?;
            let loss = out.loss.f_double_value(&[])?;
            ensure!(loss.is_finite(), "{name}: non-finite loss at step {step}");
            if step == 0 {
                println!("  step  0 loss {loss:.6}");
                // The policy starts as the reference, so DPO's h = 0 and its loss is ln 2.
                ensure!(
                    !name.starts_with("DPO") || (loss - std::f64::consts::LN_2).abs() < 1e-6,
                    "DPO at the reference is not ln 2"
                );
            }
            last = Some(out);
        }
        let out = last.ok_or_else(|| anyhow::anyhow!("no training step ran"))?;
        println!(
            "  step {:2} loss {:.6}, metrics of that step:",
            STEPS - 1,
            out.loss.f_double_value(&[])?
        );
        for (metric, value) in out.metrics.to_means() {
            println!("    {metric:<32} {value:>10.4}");
        }
        let moved = tch::no_grad(|| logps(&policy, &batch))?.sum.f_sub(&r)?;
        println!("  log p(response) − reference after {STEPS} steps: {}\n", fmt(&moved)?);
        summary.push((name.split(' ').next().unwrap_or(name), Vec::<f32>::try_from(&moved)?));
    }

    println!("change of log p(response) against the reference, per candidate (reward):");
    let header: Vec<String> =
        REWARDS.iter().enumerate().map(|(k, r)| format!("{k} ({r:+})")).collect();
    println!("  {:<7} {}", "method", header.iter().map(|h| format!("{h:>10}")).collect::<String>());
    for (name, moved) in summary {
        let cells: String = moved.iter().map(|d| format!("{d:>10.3}")).collect();
        println!("  {name:<7} {cells}");
    }
    Ok(())
}

/// Policy log-probabilities of every candidate's response tokens, `[K]`.
fn logps(model: &Gpt2, batch: &Batch) -> Result<SeqLogps> {
    let logits = model.forward(&batch.ids, Some(&batch.attention))?;
    Ok(seq_logps(&logits, &batch.ids, &batch.completion, &SeqLogpsConfig::default())?)
}

fn candidate_batch() -> Result<Batch> {
    let width = PROMPT.len() + RESPONSES.iter().map(|r| r.len()).max().unwrap_or(0);
    let (mut ids, mut attention, mut completion) = (vec![], vec![], vec![]);
    for response in RESPONSES {
        let real = PROMPT.len() + response.len();
        ids.extend(PROMPT.iter().chain(response).copied());
        ids.extend(std::iter::repeat_n(PAD, width - real));
        attention.extend((0..width).map(|t| i64::from(t < real)));
        completion.extend((0..width).map(|t| i64::from(t >= PROMPT.len() && t < real)));
    }
    let shape = [RESPONSES.len() as i64, width as i64];
    let tensor = |v: &[i64]| Tensor::f_from_slice(v)?.f_reshape(shape);
    Ok(Batch {
        ids: tensor(&ids)?,
        attention: tensor(&attention)?,
        completion: tensor(&completion)?,
    })
}

fn fmt(t: &Tensor) -> Result<String> {
    let v = Vec::<f32>::try_from(t)?;
    Ok(v.iter().map(|x| format!("{x:>9.3}")).collect::<Vec<_>>().join(" "))
}
