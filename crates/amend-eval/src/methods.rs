//! The method runners: every method starts from the same base model `p°`, sees the same prompt
//! groups in the same order, and trains for the same number of AdamW steps at the same learning
//! rate ([`Budget`]); only its loss (and its one strength knob) differs.
//!
//! # Data of a step
//!
//! Each step takes `prompts_per_step` usable prompt groups (a seeded shuffle of the usable
//! groups, the same order for every method, repeated as epochs). The rows of the step are the
//! groups' clean and unwanted responses; NEAT adds the groups' negative-prompt samples. How each
//! method uses the rows:
//!
//! | method | loss on the step's rows | strength |
//! |---|---|---|
//! | TNFF, TNRR, TNRF, TNFLL, TNRLL | [`tnt_loss`] on every response token (`w = −1` unwanted, `+1` other), reference `p°`, mean over tokens | `α` |
//! | NL | [`nl_loss`] (NLL on `+1`, `α·log p` on `−1`, floored at −10.3), mean over tokens | `α` |
//! | UL | [`ul_annotated_loss`] (NLL on `+1`, `−α·log(1 − p)` on `−1`), mean over tokens | `α` |
//! | Welleck UL | [`welleck_ul_loss`]: NLL on the `+1` tokens, `−α·Σ_c log(1 − p_c)` over the candidates `c` = tokens that start an unwanted word in the data, at every `+1` position | `α` |
//! | NPO | [`npo_loss`]: forget = unwanted responses, retain = clean responses (NLL, weight 1), reference `p°` | `β` |
//! | DPO | [`dpo_loss`] (sigmoid): each unwanted response is paired with a clean response of the same prompt | `β` |
//! | CP | [`contrastive_perplexity_loss`] (paper form, `α = 1`): per prompt, positives = clean, negatives = unwanted | `τ` |
//! | RRHF | [`rrhf_loss`]: the prompt's responses as candidates, reward 1 clean / 0 unwanted, SFT on a clean one | rank weight |
//! | NEAT | [`neat_loss`]: RRHF candidates plus the negative-prompt samples (scored without the prefix, forced lowest) | rank weight |
//!
//! ProFS is not trained: [`profs_method`] projects the unwanted subspace out of the MLP value
//! weights ([`profs_edit`]), tuning-free, from preference pairs built from the same usable
//! groups (each unwanted response paired with a clean response of its prompt, as for DPO). Its
//! knob is the rank `k` of the projected subspace; the edited layers are
//! [`profs_layers`] (the upper 60 % of the blocks; the reference sets its ranges by hand per
//! model, see there). The budget does not apply to it; its wall time is reported like the
//! others'.
//!
//! [`tnt_loss`]: amend_losses::tnt_loss
//! [`nl_loss`]: amend_losses::nl_loss
//! [`ul_annotated_loss`]: amend_losses::ul_annotated_loss
//! [`welleck_ul_loss`]: amend_losses::welleck_ul_loss
//! [`npo_loss`]: amend_losses::npo_loss
//! [`dpo_loss`]: amend_losses::dpo_loss
//! [`contrastive_perplexity_loss`]: amend_losses::contrastive_perplexity_loss
//! [`rrhf_loss`]: amend_losses::rrhf_loss
//! [`neat_loss`]: amend_losses::neat_loss
//! [`profs_edit`]: amend_edit::profs::profs_edit

use std::ops::Range;

use amend_edit::profs::{PreferencePair, ProfsConfig, profs_edit};
use amend_losses::{
    CandidateSet, Candidates, CpConfig, CpGroups, DpoConfig, EmptyPolicy, LossOutput, NeatConfig,
    NlConfig, NpoConfig, Origin, Reduction, RrhfConfig, SeqLogps, SeqLogpsConfig, TntConfig,
    TntVariant, TokenWeights, UlAnnotatedConfig, WelleckUlConfig, contrastive_perplexity_loss,
    cp_phi_from_logps, dpo_loss, neat_loss, nl_loss, npo_loss, rrhf_loss, seq_logps, tnt_loss,
    ul_annotated_loss, welleck_ul_loss,
};
use amend_models::CausalLm;
use amend_models::train::{AdamWConfig, ScheduleKind, TrainConfig, Trainer};
use rand::SeedableRng;
use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::annotate::{SampleOrigin, TrainingData};
use crate::{Error, Result};

/// A method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Method {
    /// TNT, forward negatives, forward positives (reference as target).
    Tnff,
    /// TNT, reverse negatives, reverse positives.
    Tnrr,
    /// TNT, reverse negatives, forward positives.
    Tnrf,
    /// TNT, forward negatives, label likelihood on positives.
    Tnfll,
    /// TNT, reverse negatives, smoothed label on positives.
    Tnrll,
    /// Negative likelihood on unwanted tokens, likelihood on the others.
    Nl,
    /// Unlikelihood on unwanted tokens, likelihood on the others.
    Ul,
    /// Welleck et al.'s token-level unlikelihood with the unwanted tokens as candidates.
    WelleckUl,
    /// Negative preference optimization (forget = unwanted, retain = clean).
    Npo,
    /// Direct preference optimization (chosen = clean, rejected = unwanted).
    Dpo,
    /// Contrastive perplexity.
    Cp,
    /// RRHF ranking with SFT.
    Rrhf,
    /// NEAT: RRHF with negative-prompt candidates.
    Neat,
    /// ProFS / DeTox projection of the MLP value weights (tuning-free edit, no training).
    Profs,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 14] = [
        Method::Tnff,
        Method::Tnrr,
        Method::Tnrf,
        Method::Tnfll,
        Method::Tnrll,
        Method::Nl,
        Method::Ul,
        Method::WelleckUl,
        Method::Npo,
        Method::Dpo,
        Method::Cp,
        Method::Rrhf,
        Method::Neat,
        Method::Profs,
    ];

    /// The display name (`"TNFF"`, `"Welleck UL"`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Tnff => "TNFF",
            Method::Tnrr => "TNRR",
            Method::Tnrf => "TNRF",
            Method::Tnfll => "TNFLL",
            Method::Tnrll => "TNRLL",
            Method::Nl => "NL",
            Method::Ul => "UL",
            Method::WelleckUl => "Welleck UL",
            Method::Npo => "NPO",
            Method::Dpo => "DPO",
            Method::Cp => "CP",
            Method::Rrhf => "RRHF",
            Method::Neat => "NEAT",
            Method::Profs => "ProFS",
        }
    }

    /// The command-line id (`"tnff"`, `"welleck_ul"`).
    pub fn id(self) -> &'static str {
        match self {
            Method::Tnff => "tnff",
            Method::Tnrr => "tnrr",
            Method::Tnrf => "tnrf",
            Method::Tnfll => "tnfll",
            Method::Tnrll => "tnrll",
            Method::Nl => "nl",
            Method::Ul => "ul",
            Method::WelleckUl => "welleck_ul",
            Method::Npo => "npo",
            Method::Dpo => "dpo",
            Method::Cp => "cp",
            Method::Rrhf => "rrhf",
            Method::Neat => "neat",
            Method::Profs => "profs",
        }
    }

    /// Parses an id or a display name (case-insensitive; `-` and ` ` read as `_`).
    ///
    /// ```
    /// use amend_eval::methods::Method;
    /// assert_eq!(Method::parse("Welleck-UL"), Some(Method::WelleckUl));
    /// assert_eq!(Method::parse("tnff"), Some(Method::Tnff));
    /// ```
    pub fn parse(s: &str) -> Option<Method> {
        let key = s.trim().to_ascii_lowercase().replace(['-', ' '], "_");
        Method::ALL.into_iter().find(|m| m.id() == key)
    }

    /// Whether the method edits the weights directly instead of training (ProFS): it takes no
    /// optimizer steps and the [`Budget`] does not apply.
    pub fn is_tuning_free(self) -> bool {
        self == Method::Profs
    }

    /// Whether the method is one of the TNT losses.
    pub fn is_tnt(self) -> bool {
        self.tnt_variant().is_some()
    }

    fn tnt_variant(self) -> Option<TntVariant> {
        match self {
            Method::Tnff => Some(TntVariant::Ff),
            Method::Tnrr => Some(TntVariant::Rr),
            Method::Tnrf => Some(TntVariant::Rf),
            Method::Tnfll => Some(TntVariant::Fll),
            Method::Tnrll => Some(TntVariant::Rll),
            _ => None,
        }
    }

    /// The name of the strength knob (`"α"`, `"β"`, `"τ"`, `"rank weight"`, `"k"`).
    pub fn strength_name(self) -> &'static str {
        match self {
            Method::Profs => "k",
            Method::Npo | Method::Dpo => "β",
            Method::Cp => "τ",
            Method::Rrhf | Method::Neat => "rank weight",
            _ => "α",
        }
    }

    /// The default sweep of the strength knob, four values from weak to strong where the knob
    /// is monotone (see `docs/compare.md` for how they were chosen):
    ///
    /// | methods | knob | values |
    /// |---|---|---|
    /// | TNT (all five), UL, Welleck UL | `α` (weight of the negative term) | 1, 10, 100, 1000 |
    /// | NL | `α` | 0.01, 0.1, 1, 10 (its negative gradient is `α(e_y − p)`, not `α·p_y`: two decades stronger per unit of `α`) |
    /// | NPO, DPO | `β` (smaller is stronger) | 0.1, 1, 10, 100 |
    /// | CP | `τ` (the paper's temperature; `α = 1`) | 0.03, 0.1, 0.3, 1 |
    /// | RRHF, NEAT | rank weight (SFT weight 1) | 0.01, 0.1, 1, 10 |
    /// | ProFS | rank `k` of the projected subspace | 1, 2, 4, 8 |
    pub fn default_sweep(self) -> Vec<f64> {
        match self {
            Method::Profs => vec![1.0, 2.0, 4.0, 8.0],
            Method::Nl => vec![0.01, 0.1, 1.0, 10.0],
            Method::Npo | Method::Dpo => vec![0.1, 1.0, 10.0, 100.0],
            Method::Cp => vec![0.03, 0.1, 0.3, 1.0],
            Method::Rrhf | Method::Neat => vec![0.01, 0.1, 1.0, 10.0],
            _ => vec![1.0, 10.0, 100.0, 1000.0],
        }
    }

    /// The sweep of `--quick`: the second and fourth values of [`Method::default_sweep`].
    pub fn quick_sweep(self) -> Vec<f64> {
        let d = self.default_sweep();
        vec![d[1], d[3]]
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The shared training budget of every method and sweep point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// Optimizer steps.
    pub steps: usize,
    /// Prompt groups per step (all their responses are the step's rows).
    pub prompts_per_step: usize,
    /// AdamW learning rate (constant after warm-up).
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// AdamW weight decay (0: no pull towards zero, which would move the model by itself).
    pub weight_decay: f64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            steps: 60,
            prompts_per_step: 4,
            lr: 1e-4,
            warmup_steps: 5,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
        }
    }
}

/// What training one sweep point produced (besides the model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    /// Loss of every step.
    pub losses: Vec<f64>,
    /// Gradient norm (before clipping) of every step.
    pub grad_norms: Vec<f64>,
    /// Rows (responses) trained on, summed over steps.
    pub rows: usize,
    /// The loss's own metrics (`tnt/neg_mass`, `rewards/margins`, …) averaged over the last 10
    /// steps.
    pub final_metrics: std::collections::BTreeMap<String, f64>,
    /// Wall time of training.
    pub seconds: f64,
    /// ProFS only: the logit-lens view of every basis direction of every edited layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lens: Vec<LensDirection>,
}

/// One basis direction `v_j` of a ProFS edit seen through the unembedding: its share of the
/// difference matrix's energy and the tokens with the largest and smallest entries of `W_U v_j`
/// (a singular vector has no sign, so both ends are kept). When the subspace is the unwanted
/// one, an end lists unwanted tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LensDirection {
    /// The edited layer.
    pub layer: usize,
    /// `j`, from 0 (the largest singular value).
    pub index: usize,
    /// `σ_j² / Σ_i σ_i²`.
    pub energy: f64,
    /// The tokens of the largest entries, largest first.
    pub top: Vec<LensToken>,
    /// The tokens of the smallest entries, smallest first.
    pub bottom: Vec<LensToken>,
}

/// A token of a [`LensDirection`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LensToken {
    /// Its decoded text (`#id` without a tokenizer).
    pub text: String,
    /// Whether it is an unwanted token of the training data: at least 90 % of its occurrences in
    /// the responses are annotated unwanted (`w = −1`).
    pub unwanted: bool,
}

impl LensDirection {
    /// Unwanted tokens at the end that has more of them.
    pub fn unwanted_tokens(&self) -> usize {
        let count = |ts: &[LensToken]| ts.iter().filter(|t| t.unwanted).count();
        count(&self.top).max(count(&self.bottom))
    }
}

/// The padded rows of one step.
struct StepBatch {
    ids: Tensor,
    attn: Tensor,
    completion: Tensor,
    /// `[R, T − 1]` weights of the shifted labels.
    weights: Tensor,
    /// Sample index of each row.
    samples: Vec<usize>,
}

fn build_batch(data: &TrainingData, samples: &[usize], pad: u32) -> Result<StepBatch> {
    let t = samples
        .iter()
        .map(|&i| data.samples[i].prompt_ids.len() + data.samples[i].response_ids.len())
        .max()
        .unwrap_or(0);
    if t < 2 {
        return Err(Error::InvalidInput {
            op: "build_batch",
            name: "samples".into(),
            reason: "rows need at least two tokens".into(),
        });
    }
    let r = samples.len();
    let mut ids = vec![i64::from(pad); r * t];
    let mut attn = vec![0i64; r * t];
    let mut comp = vec![0i64; r * t];
    let mut w = vec![0f32; r * (t - 1)];
    for (row, &i) in samples.iter().enumerate() {
        let s = &data.samples[i];
        let p = s.prompt_ids.len();
        for (k, &id) in s.prompt_ids.iter().chain(&s.response_ids).enumerate() {
            ids[row * t + k] = i64::from(id);
            attn[row * t + k] = 1;
            if k >= p {
                comp[row * t + k] = 1;
                // Token k is predicted at position k − 1 of the shifted logits.
                w[row * (t - 1) + k - 1] = f32::from(s.weights[k - p]);
            }
        }
    }
    let shape = [r as i64, t as i64];
    Ok(StepBatch {
        ids: Tensor::f_from_slice(&ids)?.f_view(shape)?,
        attn: Tensor::f_from_slice(&attn)?.f_view(shape)?,
        completion: Tensor::f_from_slice(&comp)?.f_view(shape)?,
        weights: Tensor::f_from_slice(&w)?.f_view([r as i64, t as i64 - 1])?,
        samples: samples.to_vec(),
    })
}

fn index(rows: &[usize]) -> Result<Tensor> {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Ok(Tensor::f_from_slice(&v)?)
}

/// The sequence log-probs of some rows of `lp`, on the graph.
fn subset(lp: &SeqLogps, rows: &[usize]) -> Result<SeqLogps> {
    let idx = index(rows)?;
    Ok(SeqLogps::from_sums(&lp.sum.f_index_select(0, &idx)?, &lp.len.f_index_select(0, &idx)?)?)
}

/// `[G, K]` layout of ragged per-group row lists: (row index tensor, mask), padding slots point
/// at row 0 and are masked.
fn ragged(groups: &[Vec<usize>]) -> Result<(Tensor, Tensor, i64)> {
    let k = groups.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut idx = Vec::with_capacity(groups.len() * k);
    let mut mask = Vec::with_capacity(groups.len() * k);
    for g in groups {
        for j in 0..k {
            idx.push(g.get(j).map_or(0, |&r| r as i64));
            mask.push(g.get(j).is_some());
        }
    }
    let shape = [groups.len() as i64, k as i64];
    Ok((
        Tensor::f_from_slice(&idx)?.f_view(shape)?,
        Tensor::f_from_slice(&mask)?.f_view(shape)?,
        k as i64,
    ))
}

fn gather2d(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let shape = idx.size();
    Ok(x.f_index_select(0, &idx.f_flatten(0, -1)?)?.f_view(shape.as_slice())?)
}

/// One step's loss for `method` at `strength`.
#[allow(clippy::too_many_arguments)]
fn step_loss(
    method: Method,
    strength: f64,
    model: &dyn CausalLm,
    base: &dyn CausalLm,
    data: &TrainingData,
    batch: &StepBatch,
    groups: &[usize],
    candidates: &Tensor,
) -> Result<LossOutput> {
    let logits = model.forward(&batch.ids, Some(&batch.attn))?;
    let t = logits.size()[1];
    let z = logits.f_narrow(1, 0, t - 1)?;
    let labels = batch.ids.f_narrow(1, 1, t - 1)?;
    let row_of = |sample: usize| batch.samples.iter().position(|&s| s == sample).unwrap_or(0);
    let mean = Reduction::Mean;
    Ok(match method {
        m if m.is_tnt() => {
            let w = TokenWeights::new(&batch.weights)?;
            let z_ref =
                base.forward_no_grad(&batch.ids, Some(&batch.attn))?.f_narrow(1, 0, t - 1)?;
            // Invariant: `is_tnt` holds, so the variant exists.
            let variant = m.tnt_variant().unwrap_or(TntVariant::Ff);
            let cfg =
                TntConfig { variant, alpha: strength, reduction: mean, ..TntConfig::default() };
            tnt_loss(&z, &z_ref, &labels, &w, &cfg)?
        }
        Method::Nl => {
            let w = TokenWeights::new(&batch.weights)?;
            nl_loss(
                &z,
                &labels,
                &w,
                &NlConfig { alpha: strength, reduction: mean, ..NlConfig::default() },
            )?
        }
        Method::Ul => {
            let w = TokenWeights::new(&batch.weights)?;
            let cfg = UlAnnotatedConfig {
                alpha: strength,
                reduction: mean,
                ..UlAnnotatedConfig::default()
            };
            ul_annotated_loss(&z, &labels, &w, &cfg)?
        }
        Method::WelleckUl => {
            let positive = batch.weights.f_gt(0.0)?;
            let labels_pos = labels.f_where_scalarother(&positive, -100)?;
            let (r, k) = (labels.size()[0], candidates.size()[0]);
            let cand =
                candidates.f_view([1, 1, k])?.f_expand([r, t - 1, k], false)?.f_contiguous()?;
            let cfg =
                WelleckUlConfig { alpha: strength, reduction: mean, ..WelleckUlConfig::default() };
            welleck_ul_loss(&z, &labels_pos, None, Candidates::Explicit(&cand), &cfg)?
        }
        _ => {
            let lp = seq_logps(&logits, &batch.ids, &batch.completion, &SeqLogpsConfig::default())?;
            let refs = |rows: &[usize]| -> Result<Tensor> {
                let v: Vec<f32> =
                    rows.iter().map(|&r| data.samples[batch.samples[r]].ref_logp as f32).collect();
                Ok(Tensor::f_from_slice(&v)?)
            };
            let grp = |g: usize| &data.groups[g];
            match method {
                Method::Npo => {
                    let forget: Vec<usize> = groups
                        .iter()
                        .flat_map(|&g| grp(g).unwanted.iter().map(|&s| row_of(s)))
                        .collect();
                    let retain: Vec<usize> = groups
                        .iter()
                        .flat_map(|&g| grp(g).clean.iter().map(|&s| row_of(s)))
                        .collect();
                    let cfg = NpoConfig { beta: strength, ..NpoConfig::default() };
                    npo_loss(
                        &subset(&lp, &forget)?,
                        &refs(&forget)?,
                        Some(&subset(&lp, &retain)?),
                        &cfg,
                    )?
                }
                Method::Dpo => {
                    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
                    for &g in groups {
                        let gr = grp(g);
                        for (j, &u) in gr.unwanted.iter().enumerate() {
                            chosen.push(row_of(gr.clean[j % gr.clean.len()]));
                            rejected.push(row_of(u));
                        }
                    }
                    let cfg = DpoConfig { beta: strength, ..DpoConfig::default() };
                    dpo_loss(
                        &subset(&lp, &chosen)?,
                        &subset(&lp, &rejected)?,
                        &refs(&chosen)?,
                        &refs(&rejected)?,
                        &cfg,
                    )?
                }
                Method::Cp => {
                    let (phi, _) = cp_phi_from_logps(
                        &lp,
                        amend_losses::CpStatistic::LogPpl,
                        EmptyPolicy::Error,
                    )?;
                    let pos: Vec<Vec<usize>> = groups
                        .iter()
                        .map(|&g| grp(g).clean.iter().map(|&s| row_of(s)).collect())
                        .collect();
                    let neg: Vec<Vec<usize>> = groups
                        .iter()
                        .map(|&g| grp(g).unwanted.iter().map(|&s| row_of(s)).collect())
                        .collect();
                    let (pi, pm, _) = ragged(&pos)?;
                    let (ni, nm, _) = ragged(&neg)?;
                    let (pp, pn) = (gather2d(&phi, &pi)?, gather2d(&phi, &ni)?);
                    let cfg = CpConfig { tau: strength, alpha: Some(1.0), ..CpConfig::default() };
                    contrastive_perplexity_loss(
                        &CpGroups::new(&pp, &pn).with_masks(&pm, &nm),
                        &cfg,
                    )?
                }
                Method::Rrhf | Method::Neat => {
                    let neat = method == Method::Neat;
                    let mut cand: Vec<Vec<usize>> = Vec::new();
                    let mut rewards: Vec<Vec<f32>> = Vec::new();
                    let mut origins: Vec<Vec<Origin>> = Vec::new();
                    for &g in groups {
                        let gr = grp(g);
                        let mut c = Vec::new();
                        let mut r = Vec::new();
                        let mut o = Vec::new();
                        let negs: &[usize] = if neat { &gr.negative } else { &[] };
                        for &s in gr.clean.iter().chain(&gr.unwanted).chain(negs) {
                            let sample = &data.samples[s];
                            c.push(row_of(s));
                            r.push(if sample.unwanted { 0.0 } else { 1.0 });
                            o.push(match sample.origin {
                                SampleOrigin::Policy => Origin::Policy,
                                SampleOrigin::NegPrompt => Origin::NegPrompt,
                                SampleOrigin::Dataset => Origin::Dataset,
                            });
                        }
                        cand.push(c);
                        rewards.push(r);
                        origins.push(o);
                    }
                    let (ci, cm, k) = ragged(&cand)?;
                    let flat_r: Vec<f32> = rewards
                        .iter()
                        .flat_map(|r| {
                            (0..k as usize).map(move |j| r.get(j).copied().unwrap_or(0.0))
                        })
                        .collect();
                    let flat_o: Vec<Origin> = origins
                        .iter()
                        .flat_map(|o| {
                            (0..k as usize)
                                .map(move |j| o.get(j).copied().unwrap_or(Origin::Policy))
                        })
                        .collect();
                    let rw = Tensor::f_from_slice(&flat_r)?.f_view([cand.len() as i64, k])?;
                    let set =
                        CandidateSet::new(&gather2d(&lp.sum, &ci)?, &gather2d(&lp.len, &ci)?, &rw)?
                            .with_mask(&cm)?;
                    if neat {
                        let cfg = NeatConfig { rank_weight: strength, ..NeatConfig::default() };
                        neat_loss(&set.with_origins(&flat_o)?, &cfg)?
                    } else {
                        let cfg = RrhfConfig { rank_weight: strength, ..RrhfConfig::default() };
                        rrhf_loss(&set, &cfg)?
                    }
                }
                _ => {
                    return Err(Error::InvalidInput {
                        op: "train_method",
                        name: "method".into(),
                        reason: format!("{method} has no training loss"),
                    });
                }
            }
        }
    })
}

/// Trains a copy of `base` with `method` at `strength` under `budget` (ProFS: edits a copy
/// with [`profs_method`] at rank `k = strength` on the default layers; the budget does not
/// apply). `seed` fixes the order
/// of the prompt groups (pass the same seed to every method) and libtorch's RNG. `on_step` is
/// called after every step with the step number and its loss.
///
/// # Errors
/// [`Error::InvalidInput`] when the data has no usable group (or NEAT finds no negative-prompt
/// sample); loss and training errors (for example [`amend_models::Error::NonFinite`]).
pub fn train_method(
    base: &dyn CausalLm,
    data: &TrainingData,
    method: Method,
    strength: f64,
    budget: &Budget,
    seed: u64,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<(Box<dyn CausalLm>, TrainStats)> {
    if method.is_tuning_free() {
        return profs_method(base, data, profs_rank(strength)?, None, seed);
    }
    let mut stats = TrainStats::default();
    let model = train_method_checkpoints(
        base,
        data,
        method,
        strength,
        budget,
        &[budget.steps],
        seed,
        on_step,
        &mut |_, _, s| {
            stats = s.clone();
            Ok(())
        },
    )?;
    Ok((model, stats))
}

/// [`train_method`] for `budget.steps` steps that stops at every step count of `checkpoints`
/// on the way and calls `on_checkpoint(steps, model, stats)` with the model and the statistics
/// so far (`final_metrics` over the last 10 steps before the checkpoint, `seconds` the training
/// time without the earlier callbacks). Because the learning
/// rate is constant after warm-up and the batch order depends only on `seed`, the model at
/// checkpoint `s` is exactly the model a run of `s` steps returns: one run gives every point of
/// a steps grid. Checkpoints outside `1..=budget.steps` are ignored; returns the final model.
///
/// # Errors
/// As [`train_method`], and whatever `on_checkpoint` returns (which stops the run).
/// [`Error::InvalidInput`] for ProFS (it is not trained).
#[allow(clippy::too_many_arguments)]
pub fn train_method_checkpoints(
    base: &dyn CausalLm,
    data: &TrainingData,
    method: Method,
    strength: f64,
    budget: &Budget,
    checkpoints: &[usize],
    seed: u64,
    on_step: &mut dyn FnMut(usize, f64),
    on_checkpoint: &mut dyn FnMut(usize, &dyn CausalLm, &TrainStats) -> Result<()>,
) -> Result<Box<dyn CausalLm>> {
    if method.is_tuning_free() {
        return Err(Error::InvalidInput {
            op: "train_method_checkpoints",
            name: "method".into(),
            reason: format!("{method} is not trained (use profs_method)"),
        });
    }
    let mut checkpoints: Vec<usize> =
        checkpoints.iter().copied().filter(|&c| c >= 1 && c <= budget.steps).collect();
    checkpoints.sort_unstable();
    checkpoints.dedup();
    let t0 = std::time::Instant::now();
    let usable = data.usable_groups();
    if usable.is_empty() {
        return Err(Error::InvalidInput {
            op: "train_method",
            name: "data".into(),
            reason: "no prompt group with both a clean and an unwanted response".into(),
        });
    }
    if method == Method::Neat && usable.iter().all(|&g| data.groups[g].negative.is_empty()) {
        return Err(Error::InvalidInput {
            op: "train_method",
            name: "data".into(),
            reason: "NEAT needs negative-prompt samples (the task has no negative prefix)".into(),
        });
    }
    let pad = base.tokenizer().map_or(0, amend_models::Tokenizer::pad_token_id);
    let candidates = {
        let v: Vec<i64> = data.unwanted_token_ids.iter().map(|&i| i64::from(i)).collect();
        Tensor::f_from_slice(&v)?
    };
    if method == Method::WelleckUl && data.unwanted_token_ids.is_empty() {
        return Err(Error::InvalidInput {
            op: "train_method",
            name: "data".into(),
            reason: "Welleck UL needs unwanted tokens in the data".into(),
        });
    }
    let mut model = base.boxed_copy()?;
    model.set_training(false);
    let cfg = TrainConfig {
        steps: budget.steps,
        lr: budget.lr,
        schedule: ScheduleKind::Constant,
        warmup_steps: budget.warmup_steps,
        min_lr_ratio: 1.0,
        optimizer: AdamWConfig { weight_decay: budget.weight_decay, ..AdamWConfig::default() },
        max_grad_norm: Some(budget.max_grad_norm),
        grad_accum_steps: 1,
        log_every: 0,
        metrics_path: None,
        checkpoint_every: None,
        checkpoint_dir: None,
        progress: false,
        seed,
    };
    let mut trainer = Trainer::new(&*model, cfg)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ 0x0bde_0000_0000_0007);
    let mut order = usable.clone();
    let mut cursor = order.len();
    let mut stats = TrainStats::default();
    let mut tail = amend_losses::Metrics::new();
    let mut pending = checkpoints.iter().copied().peekable();
    let mut paused = std::time::Duration::ZERO;
    for step in 0..budget.steps {
        let next_checkpoint = pending.peek().copied().unwrap_or(budget.steps);
        let mut groups = Vec::with_capacity(budget.prompts_per_step);
        for _ in 0..budget.prompts_per_step.max(1) {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            groups.push(order[cursor]);
            cursor += 1;
        }
        let mut rows = Vec::new();
        for &g in &groups {
            let gr = &data.groups[g];
            rows.extend(gr.clean.iter().chain(&gr.unwanted));
            if method == Method::Neat {
                rows.extend(&gr.negative);
            }
        }
        let batch = build_batch(data, &rows, pad)?;
        let mut failed = None;
        let report = trainer.step(&mut *model, |m, st| {
            match step_loss(method, strength, m, base, data, &batch, &groups, &candidates) {
                Ok(out) => {
                    if step + 10 >= next_checkpoint {
                        tail.merge(&out.metrics);
                    }
                    st.backward(&out.loss)?;
                    Ok(())
                }
                Err(e) => {
                    failed = Some(e);
                    // The real error is returned below; this only stops the step.
                    Err(amend_models::Error::InvalidInput {
                        op: "train_method",
                        name: "loss",
                        reason: "the loss failed".into(),
                    })
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let report = report?;
        stats.losses.push(report.loss);
        stats.grad_norms.push(report.grad_norm);
        stats.rows += rows.len();
        on_step(step + 1, report.loss);
        if pending.peek() == Some(&(step + 1)) {
            pending.next();
            model.set_training(false);
            stats.final_metrics = std::mem::take(&mut tail).to_means();
            // Training time only: the earlier checkpoints' callbacks (evaluations) excluded.
            stats.seconds = (t0.elapsed() - paused).as_secs_f64();
            let t_pause = std::time::Instant::now();
            on_checkpoint(step + 1, &*model, &stats)?;
            paused += t_pause.elapsed();
        }
    }
    model.set_training(false);
    Ok(model)
}

/// The layers ProFS edits in an `L`-layer model when none are given: `⌊2L/5⌋..L`, the upper
/// 60 % of the blocks (every layer of a one- or two-layer model).
///
/// The reference code (DeTox / ProFS, Uppaal et al.) fixes its ranges by hand per model: layers
/// 10..24 of gpt2-medium's 24, 15..32 of Mistral-7B's 32 and 10..32 of OPT's 32, which start at
/// 42 %, 47 % and 31 % of the depth. No single formula gives all three; this default follows
/// their proportion (the upper layers, 9..24 for 24 layers), it does not reproduce them. Pass
/// the range explicitly (`amend edit project --layers 10..24`) to match the reference on one of
/// those models.
///
/// ```
/// use amend_eval::methods::profs_layers;
/// assert_eq!(profs_layers(2), 0..2);
/// assert_eq!(profs_layers(24), 9..24);
/// ```
pub fn profs_layers(num_layers: usize) -> Range<usize> {
    (2 * num_layers / 5)..num_layers
}

/// The ProFS rank of a sweep value.
///
/// # Errors
/// [`Error::InvalidInput`] unless `strength` is a positive integer.
pub(crate) fn profs_rank(strength: f64) -> Result<usize> {
    if strength >= 1.0 && strength.fract() == 0.0 && strength < 1e9 {
        Ok(strength as usize)
    } else {
        Err(Error::InvalidInput {
            op: "train_method",
            name: "strength".into(),
            reason: format!("the ProFS rank k must be a positive integer, got {strength}"),
        })
    }
}

/// The preference pairs of ProFS: in every usable prompt group, each unwanted response paired
/// with a clean response of the same prompt (cycling through the clean ones, as DPO pairs them),
/// each side the prompt text followed by the response text.
pub fn profs_pairs(data: &TrainingData) -> Vec<PreferencePair> {
    let mut pairs = Vec::new();
    for g in data.usable_groups() {
        let gr = &data.groups[g];
        for (j, &u) in gr.unwanted.iter().enumerate() {
            let clean = &data.samples[gr.clean[j % gr.clean.len()]];
            let unwanted = &data.samples[u];
            pairs.push(PreferencePair::new(
                format!("{}{}", gr.prompt, clean.text),
                format!("{}{}", gr.prompt, unwanted.text),
            ));
        }
    }
    pairs
}

/// ProFS on a copy of `base`: projects the rank-`k` unwanted subspace, estimated from
/// [`profs_pairs`] of `data` (all of them), out of the MLP value weights of `layers` (default
/// [`profs_layers`]) with [`profs_edit`] and the reference settings otherwise (centering on the
/// top singular direction of the clean embeddings, masked mean pooling). Texts are cut to the
/// model's positions.
///
/// The returned [`TrainStats`] has no losses; its `final_metrics` hold `profs/pairs`,
/// `profs/layer_start`, `profs/layer_end`, and the mean over edited layers of
/// `profs/explained_energy` and `profs/sigma_k_over_sigma_1`; its `lens` the logit-lens view of
/// every basis direction ([`LensDirection`], with the training data's unwanted tokens marked:
/// those annotated unwanted at 90 % of their occurrences or more).
///
/// # Errors
/// [`Error::InvalidInput`] when the data has no usable group; [`Error::Edit`] from
/// [`profs_edit`] (for example `k` larger than the number of pairs or the hidden size).
pub fn profs_method(
    base: &dyn CausalLm,
    data: &TrainingData,
    k: usize,
    layers: Option<Range<usize>>,
    seed: u64,
) -> Result<(Box<dyn CausalLm>, TrainStats)> {
    let t0 = std::time::Instant::now();
    let pairs = profs_pairs(data);
    if pairs.is_empty() {
        return Err(Error::InvalidInput {
            op: "profs_method",
            name: "data".into(),
            reason: "no prompt group with both a clean and an unwanted response".into(),
        });
    }
    let layers = layers.unwrap_or_else(|| profs_layers(base.config().num_layers()));
    let cfg = ProfsConfig {
        k: Some(k),
        layers: Some(layers.clone()),
        n_pairs: pairs.len(),
        seed,
        max_len: crate::annotate::max_positions(base).min(512),
        ..ProfsConfig::default()
    };
    let mut model = base.boxed_copy()?;
    let report = profs_edit(&mut *model, &pairs, &cfg)?;
    let edited: Vec<_> = report.layer_summaries.iter().filter(|l| !l.skipped).collect();
    let mean = |f: &dyn Fn(&amend_edit::profs::LayerSummary) -> f64| {
        edited.iter().map(|l| f(l)).sum::<f64>() / edited.len().max(1) as f64
    };
    let mut stats = TrainStats { rows: 2 * report.pairs_used, ..TrainStats::default() };
    let m = &mut stats.final_metrics;
    m.insert("profs/pairs".into(), report.pairs_used as f64);
    m.insert("profs/layer_start".into(), layers.start as f64);
    m.insert("profs/layer_end".into(), layers.end as f64);
    m.insert("profs/explained_energy".into(), mean(&|l| l.explained_energy));
    m.insert("profs/sigma_k_over_sigma_1".into(), mean(&|l| l.sigma_k_over_sigma_1));
    m.insert("profs/warnings".into(), report.warnings.len() as f64);
    // Unwanted tokens: at least 90 % of their occurrences in the responses are annotated
    // unwanted (so `blorp`, not the pieces `le` or ` w` that unwanted words share with clean
    // ones).
    let mut seen: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
    for s in &data.samples {
        for (&id, &w) in s.response_ids.iter().zip(&s.weights) {
            let e = seen.entry(id).or_default();
            e.0 += usize::from(w < 0);
            e.1 += 1;
        }
    }
    let unwanted: std::collections::BTreeSet<u32> =
        seen.into_iter().filter(|(_, (neg, all))| 10 * neg >= 9 * all).map(|(id, _)| id).collect();
    let token = |id: i64| LensToken {
        text: match (base.tokenizer(), u32::try_from(id)) {
            (Some(tok), Ok(t)) => tok.decode(&[t], false).unwrap_or_else(|_| format!("#{id}")),
            _ => format!("#{id}"),
        },
        unwanted: u32::try_from(id).is_ok_and(|t| unwanted.contains(&t)),
    };
    for l in &edited {
        for (j, d) in l.directions.iter().enumerate() {
            stats.lens.push(LensDirection {
                layer: l.layer,
                index: j,
                energy: d.energy,
                top: d.top_tokens.iter().map(|&t| token(t)).collect(),
                bottom: d.bottom_tokens.iter().map(|&t| token(t)).collect(),
            });
        }
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok((model, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotate::Sample;

    fn sample(prompt: &[u32], response: &[u32], weights: &[i8]) -> Sample {
        Sample {
            group: 0,
            origin: SampleOrigin::Policy,
            prompt_ids: prompt.to_vec(),
            response_ids: response.to_vec(),
            text: String::new(),
            weights: weights.to_vec(),
            unwanted: weights.contains(&-1),
            ref_logp: 0.0,
        }
    }

    /// The weight of response token k sits at shifted position k − 1, where logits[k − 1]
    /// predict it; prompt and padding positions are 0 and masked.
    #[test]
    fn batches_align_weights_with_shifted_labels() {
        let data = TrainingData {
            samples: vec![sample(&[9, 5], &[7, 8, 0], &[1, -1, 1]), sample(&[9], &[6], &[1])],
            ..TrainingData::default()
        };
        let b = build_batch(&data, &[0, 1], 3).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(b.ids.flatten(0, -1)).unwrap(),
            [9, 5, 7, 8, 0, 9, 6, 3, 3, 3]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.attn.flatten(0, -1)).unwrap(),
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.completion.flatten(0, -1)).unwrap(),
            [0, 0, 1, 1, 1, 0, 1, 0, 0, 0]
        );
        // Labels are ids[:, 1:] = [5, 7, 8, 0] and [6, pad, pad, pad].
        assert_eq!(
            Vec::<f32>::try_from(b.weights.flatten(0, -1)).unwrap(),
            [0.0, 1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn ragged_groups_are_masked() {
        let (idx, mask, k) = ragged(&[vec![3, 1], vec![2]]).unwrap();
        assert_eq!(k, 2);
        assert_eq!(Vec::<i64>::try_from(idx.flatten(0, -1)).unwrap(), [3, 1, 2, 0]);
        assert_eq!(Vec::<bool>::try_from(mask.flatten(0, -1)).unwrap(), [true, true, true, false]);
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.id()), Some(m));
            assert_eq!(Method::parse(m.name()), Some(m));
            assert_eq!(m.default_sweep().len(), 4);
            assert_eq!(m.quick_sweep().len(), 2);
        }
        assert_eq!(Method::parse("nope"), None);
    }
}
