//! Sentence embeddings per layer (spec A.3 steps 2–4).

use indicatif::ProgressBar;
use tch::{Kind, Tensor};

use amend_models::{CausalLm, ForwardOptions};

use super::config::Pooling;
use crate::{Error, Result};

/// Pads `seqs` on the right to `len` with `pad`; returns `[b, len]` ids and mask (i64).
fn pad_right(
    seqs: &[&Vec<u32>],
    len: usize,
    pad: u32,
    device: tch::Device,
) -> Result<(Tensor, Tensor)> {
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for s in seqs {
        ids.extend(s.iter().map(|&t| i64::from(t)));
        ids.extend(std::iter::repeat_n(i64::from(pad), len - s.len()));
        mask.extend(std::iter::repeat_n(1i64, s.len()));
        mask.extend(std::iter::repeat_n(0i64, len - s.len()));
    }
    let shape = [seqs.len() as i64, len as i64];
    Ok((
        Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(device)?,
        Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(device)?,
    ))
}

/// Pooled hidden states of token sequences at the given layers.
///
/// `h_ℓ` is the residual stream after block `ℓ`, before any final norm (`hidden_states[ℓ + 1]`
/// of [`CausalLm::forward_with`]: the same definition for every family, D6).
///
/// ```text
/// MeanMasked:        x_ℓ = Σ_t m_t h_ℓ(t) / Σ_t m_t
/// MeanAllPositions:  x_ℓ = (1/S) Σ_{t<S} h_ℓ(t)     S = longest sequence of `seqs`
/// ```
///
/// Sequences are right-padded with the tokenizer's pad id (EOS when there is none). Every row is
/// processed (the last batch may be partial, PF-2), and each batch is pooled immediately: memory
/// is `layers · N · D` floats.
///
/// # Shapes
/// Returns one `[seqs.len(), hidden]` f32 tensor per entry of `layers`.
///
/// # Errors
/// [`Error::InvalidInput`] for no sequences, an empty sequence, `batch = 0` or a layer out of
/// range; errors of the forward pass.
pub fn pooled_embeddings<M: CausalLm + ?Sized>(
    model: &M,
    seqs: &[Vec<u32>],
    layers: &[usize],
    pooling: Pooling,
    batch: usize,
    progress: Option<&ProgressBar>,
) -> Result<Vec<Tensor>> {
    const OP: &str = "pooled_embeddings";
    if seqs.is_empty() {
        return Err(Error::invalid(OP, "seqs", "no sequences"));
    }
    if let Some(i) = seqs.iter().position(Vec::is_empty) {
        return Err(Error::invalid(OP, "seqs", format!("sequence {i} has no tokens")));
    }
    if batch == 0 {
        return Err(Error::invalid(OP, "batch", "must be positive"));
    }
    let num_layers = model.num_layers();
    if let Some(&l) = layers.iter().find(|&&l| l >= num_layers) {
        return Err(Error::invalid(OP, "layers", format!("layer {l} >= {num_layers} layers")));
    }
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let pad = model.tokenizer().map_or(0, |t| t.pad_token_id());
    let global_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut per_layer: Vec<Vec<Tensor>> = layers.iter().map(|_| Vec::new()).collect();
    for chunk in seqs.chunks(batch) {
        let refs: Vec<&Vec<u32>> = chunk.iter().collect();
        let len = match pooling {
            Pooling::MeanMasked => chunk.iter().map(Vec::len).max().unwrap_or(0),
            Pooling::MeanAllPositions => global_len,
        };
        let (ids, mask) = pad_right(&refs, len, pad, device)?;
        let out = model.forward_with(&ids, Some(&mask), None, ForwardOptions::hidden_only())?;
        if out.hidden_states.len() != num_layers + 1 {
            return Err(Error::invalid(
                OP,
                "model",
                format!(
                    "adapter returned {} hidden states for {num_layers} layers",
                    out.hidden_states.len()
                ),
            ));
        }
        for (slot, &l) in per_layer.iter_mut().zip(layers) {
            let pooled = pool_hidden(&out.hidden_states[l + 1], &mask, pooling)?;
            slot.push(pooled);
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    per_layer.into_iter().map(|parts| Ok(Tensor::f_cat(&parts, 0)?)).collect()
}

/// Pools one hidden-state tensor (exposed for tests of the pooling definitions).
///
/// ```text
/// MeanMasked:        x = Σ_t m_t h(t) / Σ_t m_t
/// MeanAllPositions:  x = (1/S) Σ_t h(t)
/// ```
///
/// # Shapes
/// `hidden: [b, S, D]`, `mask: [b, S]` (1 = token) → `[b, D]` f32.
///
/// # Errors
/// [`Error::ShapeMismatch`]; [`Error::InvalidInput`] for a row with no tokens under
/// `MeanMasked`; [`Error::Tch`].
///
/// # Example
///
/// The test vector of spec A.3 step 4:
///
/// ```
/// use amend_edit::profs::{pool_hidden, Pooling};
/// use tch::Tensor;
/// let h = Tensor::from_slice(&[1.0f32, 2., 3., 4., 100., 100.]).view([1, 3, 2]);
/// let m = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
/// let x = pool_hidden(&h, &m, Pooling::MeanMasked)?;
/// assert_eq!(Vec::<f32>::try_from(x.flatten(0, -1))?, vec![2.0, 3.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pool_hidden(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    const OP: &str = "pool_hidden";
    let hs = hidden.size();
    let ms = mask.size();
    if hs.len() != 3 || ms.len() != 2 || hs[..2] != ms[..] {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "mask",
            expected: hs.get(..2).map_or(vec![-1, -1], <[i64]>::to_vec),
            got: ms,
        });
    }
    let h = hidden.f_to_kind(Kind::Float)?;
    match pooling {
        Pooling::MeanMasked => {
            let m = mask.f_ne(0)?;
            let count = m.f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?;
            if bool::try_from(count.f_eq(0.0)?.f_any()?)? {
                return Err(Error::invalid(OP, "mask", "a row has no tokens"));
            }
            Ok(h.f_masked_fill(&m.f_logical_not()?.f_unsqueeze(2)?, 0.0)?
                .f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?
                .f_div(&count.f_unsqueeze(1)?)?)
        }
        Pooling::MeanAllPositions => Ok(h.f_mean_dim(&[1i64][..], false, Kind::Float)?),
    }
}
