//! Training rows and batches with position-based target masks (FT-1, FT-2).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use amend_models::tokenizer::PaddingSide;

use super::recipe::{MaskMode, Objective};
use crate::{Error, Result};

/// Where a training row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    /// An edit (E): rewrite prompt → `target_new`.
    Edit,
    /// A pseudo-paraphrase (P): prefix + rewrite prompt → `target_new`.
    Paraphrase,
    /// A locality fact (R): other prompt → its true answer.
    Locality,
}

/// One training row: `ids(prompt)` and `ids(" " + target)`, kept apart so the boundary is exact
/// (FT-2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRow {
    /// Prompt token ids (with the model's special tokens, e.g. BOS).
    pub prompt_ids: Vec<u32>,
    /// Target token ids (of `" " + target`, no special tokens).
    pub target_ids: Vec<u32>,
    /// Origin.
    pub kind: RowKind,
    /// Index of the edit request it belongs to.
    pub request: usize,
}

/// A padded training batch.
///
/// For [`Objective::Conditional`] and [`Objective::Full`] the rows are `prompt ⊕ target (⊕ EOS)`
/// and `target_mask[b, j]` marks the positions whose token is trained (predicted by the logits
/// at `j − 1`). For [`Objective::PromptLast`] the rows are the prompts only, `last_prompt[b]` is
/// the position of each row's last prompt token and `targets` / `targets_mask` hold the
/// right-padded target ids.
#[derive(Debug)]
pub struct TrainBatch {
    /// `[B, T]` i64.
    pub input_ids: Tensor,
    /// `[B, T]` i64, 1 = token.
    pub attention_mask: Tensor,
    /// `[B, T]` bool (empty for `PromptLast`).
    pub target_mask: Tensor,
    /// `[B]` i64 (`PromptLast`).
    pub last_prompt: Tensor,
    /// `[B, L]` i64 (`PromptLast`).
    pub targets: Tensor,
    /// `[B, L]` bool (`PromptLast`).
    pub targets_mask: Tensor,
    /// Target tokens in the batch (the normaliser of `TokenMean`).
    pub target_tokens: usize,
}

/// How rows become a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Objective.
    pub objective: Objective,
    /// Target mask construction.
    pub mask: MaskMode,
    /// Padding id.
    pub pad: u32,
    /// EOS appended after the target (no loss), if any.
    pub eos: Option<u32>,
    /// Padding side.
    pub side: PaddingSide,
    /// Longest row: prompt tokens are dropped from the left beyond it.
    pub max_length: Option<usize>,
}

/// Builds a padded batch from rows.
///
/// Position masks (FT-1): with `p_i` pad tokens before row `i` (left padding, 0 for right
/// padding) the target occupies positions `[p_i + |c_i|, p_i + |c_i| + |o_i|)`. Under
/// [`MaskMode::ValueMaskCompat`] every predicted real position whose token occurs in the row's
/// target is trained instead (the authors' behaviour, DF1). [`Objective::Full`] trains every
/// predicted real position except the appended EOS.
///
/// # Errors
/// [`Error::InvalidInput`] for no rows, a row with an empty prompt or target, or a target longer
/// than `max_length`; [`Error::Tch`].
pub fn build_batch(rows: &[&EditRow], opts: &BatchOptions, device: Device) -> Result<TrainBatch> {
    const OP: &str = "build_batch";
    if rows.is_empty() {
        return Err(Error::invalid(OP, "rows", "no rows"));
    }
    // Per row: (prompt, target, eos?) after truncation.
    let mut parts: Vec<(&[u32], &[u32])> = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        if r.prompt_ids.is_empty() || r.target_ids.is_empty() {
            return Err(Error::InvalidEdit {
                index: r.request,
                field: format!("row {i}"),
                reason: "prompt and target must both have tokens".into(),
            });
        }
        let extra = r.target_ids.len() + usize::from(opts.eos.is_some());
        let mut prompt: &[u32] = &r.prompt_ids;
        if let Some(max) = opts.max_length {
            if extra >= max {
                return Err(Error::InvalidEdit {
                    index: r.request,
                    field: "target_new".into(),
                    reason: format!(
                        "target of {} tokens leaves no room for the prompt in max_length {max}",
                        r.target_ids.len()
                    ),
                });
            }
            let keep = (max - extra).min(prompt.len());
            prompt = &prompt[prompt.len() - keep..];
        }
        parts.push((prompt, &r.target_ids));
    }
    let b = rows.len();
    let pad = i64::from(opts.pad);
    let target_tokens: usize = parts.iter().map(|(_, t)| t.len()).sum();
    if opts.objective == Objective::PromptLast {
        let t = parts.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let l = parts.iter().map(|(_, o)| o.len()).max().unwrap_or(0);
        let mut ids = vec![pad; b * t];
        let mut mask = vec![0i64; b * t];
        let mut last = Vec::with_capacity(b);
        let mut tg = vec![0i64; b * l];
        let mut tm = vec![false; b * l];
        for (r, (p, o)) in parts.iter().enumerate() {
            let off = match opts.side {
                PaddingSide::Left => t - p.len(),
                PaddingSide::Right => 0,
            };
            for (j, &x) in p.iter().enumerate() {
                ids[r * t + off + j] = i64::from(x);
                mask[r * t + off + j] = 1;
            }
            last.push((off + p.len() - 1) as i64);
            for (j, &x) in o.iter().enumerate() {
                tg[r * l + j] = i64::from(x);
                tm[r * l + j] = true;
            }
        }
        let to = |v: &[i64], s: [i64; 2]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(v)?.f_view(s)?.f_to_device(device)?)
        };
        return Ok(TrainBatch {
            input_ids: to(&ids, [b as i64, t as i64])?,
            attention_mask: to(&mask, [b as i64, t as i64])?,
            target_mask: Tensor::f_zeros([0], (Kind::Bool, device))?,
            last_prompt: Tensor::f_from_slice(&last)?.f_to_device(device)?,
            targets: to(&tg, [b as i64, l as i64])?,
            targets_mask: Tensor::f_from_slice(&tm)?
                .f_view([b as i64, l as i64])?
                .f_to_device(device)?,
            target_tokens,
        });
    }
    let eos_len = usize::from(opts.eos.is_some());
    let t = parts.iter().map(|(p, o)| p.len() + o.len() + eos_len).max().unwrap_or(0);
    let mut ids = vec![pad; b * t];
    let mut mask = vec![0i64; b * t];
    let mut tmask = vec![false; b * t];
    for (r, (p, o)) in parts.iter().enumerate() {
        let len = p.len() + o.len() + eos_len;
        let off = match opts.side {
            PaddingSide::Left => t - len,
            PaddingSide::Right => 0,
        };
        let row: Vec<u32> = p.iter().chain(o.iter()).copied().chain(opts.eos).collect();
        for (j, &x) in row.iter().enumerate() {
            ids[r * t + off + j] = i64::from(x);
            mask[r * t + off + j] = 1;
        }
        let start = off + p.len();
        match (opts.objective, opts.mask) {
            (Objective::Full, _) => {
                for j in off + 1..start + o.len() {
                    tmask[r * t + j] = true;
                }
            }
            (_, MaskMode::ValueMaskCompat) => {
                for j in off + 1..off + len {
                    if o.contains(&row[j - off]) {
                        tmask[r * t + j] = true;
                    }
                }
            }
            _ => {
                for j in start..start + o.len() {
                    tmask[r * t + j] = true;
                }
            }
        }
    }
    let shape = [b as i64, t as i64];
    Ok(TrainBatch {
        input_ids: Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(device)?,
        attention_mask: Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(device)?,
        target_mask: Tensor::f_from_slice(&tmask)?.f_view(shape)?.f_to_device(device)?,
        last_prompt: Tensor::f_zeros([0], (Kind::Int64, device))?,
        targets: Tensor::f_zeros([0], (Kind::Int64, device))?,
        targets_mask: Tensor::f_zeros([0], (Kind::Bool, device))?,
        target_tokens,
    })
}
