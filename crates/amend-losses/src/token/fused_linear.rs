//! Fused-linear token losses: start from hidden states and the LM head, chunk over rows, never
//! materialise the `[N, V]` logits or their gradient.
//!
//! Per chunk of `C` active rows: `z_c = h_c·Wᵀ (+ b)`, the row loss and `G_c = ∂ℓ/∂z_c` in the
//! forward call, then `g_h[c] = G_c·W` and `grad_W += G_cᵀ·h_c` accumulated inside the GEMM
//! (`addmm_`). The gradients are injected into autograd at `h`, `W` and `b` through the
//! surrogate `Σℓ + s − s.detach()` with `s = ⟨g_h, h⟩ + ⟨g_W, W⟩ + ⟨g_b, b⟩`. Design notes:
//! `specs/kernels-and-performance.md` §3–4; prior art: Liger-Kernel's fused linear
//! cross-entropy, torchtune's `LinearCrossEntropyLoss`.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::common::{
    MetricSink, NonFinitePolicy, RowSelection, TokenBackend, as_ids, as_mask, check_device,
    check_finite_rows, check_shape, compute_kind, count_and_check_ids,
};
use amend_kernels::{KernelError, LogitsIo, SelectedLogpConfig, SelectedLogpOut, TntRowStats};

use super::kernel;
use super::nll::{NllConfig, NllRows, nll_metrics};
use super::rows::{RowLoss, Rows, row_loss_and_grad};
use super::tnt::{
    TntConfig, TntKernelStats, TntRows, kernel_config as tnt_kernel_config, tnt_metrics,
};
use super::weights::TokenWeights;
use crate::bridge::{ChunkBuf, CpuBuf, CpuSlice};
use crate::{Error, LossOutput, LossPart, Metrics, Reduction, Result};

/// An LM head: `logits = hidden · weightᵀ (+ bias)`.
#[derive(Debug, Clone, Copy)]
pub struct LinearHead<'a> {
    /// Weight `[V, H]` (the `lm_head` / tied embedding matrix).
    pub weight: &'a Tensor,
    /// Optional bias `[V]`.
    pub bias: Option<&'a Tensor>,
}

impl<'a> LinearHead<'a> {
    /// A head without bias.
    pub fn new(weight: &'a Tensor) -> Self {
        LinearHead { weight, bias: None }
    }

    /// Sets the bias.
    pub fn with_bias(mut self, bias: &'a Tensor) -> Self {
        self.bias = Some(bias);
        self
    }
}

/// The reference (frozen, original) model's side of a fused-linear TNT loss. Always constant.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Reference<'a> {
    /// Reference hidden states (`[N, H°]` or `[B, T, H°]`, same leading shape as `hidden`) and
    /// head (`[V, H°]`); reference logits are computed chunk by chunk under `no_grad`.
    Head {
        /// Reference hidden states.
        hidden: &'a Tensor,
        /// Reference LM head.
        head: LinearHead<'a>,
    },
    /// Precomputed reference logits or log-probabilities (`[N, V]` or `[B, T, V]`), for a frozen
    /// reference reused across steps. Only the active rows are read.
    Logits(&'a Tensor),
}

/// Chunking options of the fused-linear losses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusedLinearOptions {
    /// Rows per chunk; `None` (default) derives it from `memory_budget_bytes`.
    pub chunk_rows: Option<usize>,
    /// Budget for the per-chunk `[C, V]` f32 buffers (default 64 MiB): `C` is the largest power
    /// of two with `C·V·4·k ≤ budget` (`k` = 1 for NLL, 2 for TNT), clamped to `[128, 1024]`.
    /// Each chunk re-reads the head, so very small chunks are slow (Liger's `C = 32` rule is
    /// 1.2× slower than the naive path on a CPU at `V = 50257`).
    pub memory_budget_bytes: usize,
}

impl Default for FusedLinearOptions {
    fn default() -> Self {
        FusedLinearOptions { chunk_rows: None, memory_budget_bytes: 64 << 20 }
    }
}

impl FusedLinearOptions {
    /// Sets [`FusedLinearOptions::chunk_rows`].
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = Some(rows);
        self
    }

    /// Sets [`FusedLinearOptions::memory_budget_bytes`].
    pub fn with_memory_budget_bytes(mut self, bytes: usize) -> Self {
        self.memory_budget_bytes = bytes;
        self
    }

    /// Rows per chunk for vocabulary `vocab` and `buffers` `[C, V]` buffers.
    pub(crate) fn chunk(&self, vocab: i64, buffers: usize) -> i64 {
        if let Some(c) = self.chunk_rows {
            return c.max(1) as i64;
        }
        let per_row = (vocab.max(1) as usize).saturating_mul(4).saturating_mul(buffers.max(1));
        let fit = (self.memory_budget_bytes / per_row).max(1);
        let pow2 = if fit.is_power_of_two() { fit } else { fit.next_power_of_two() / 2 };
        pow2.clamp(128, 1024) as i64
    }
}

/// Validated inputs of a fused-linear problem, flattened to rows.
struct Problem<'a> {
    op: &'static str,
    /// Leading shape of `hidden` (`[N]` or `[B, T]`).
    lead: Vec<i64>,
    kind: Kind,
    vocab: i64,
    hidden: Tensor,
    head: LinearHead<'a>,
    reference: Option<Reference<'a>>,
    labels: Tensor,
    neg: Option<Tensor>,
    active: Tensor,
    count: i64,
}

/// Checks that `x` is `lead + [features]`.
fn check_leading(op: &'static str, name: &'static str, x: &Tensor, lead: &[i64]) -> Result<()> {
    let size = x.size();
    if size.len() != lead.len() + 1 || size[..lead.len()] != *lead {
        return Err(Error::ShapeMismatch {
            op,
            name,
            expected: format!("{lead:?} + [features]"),
            got: size,
        });
    }
    Ok(())
}

fn check_head(
    op: &'static str,
    name: &'static str,
    head: &LinearHead<'_>,
    hidden_dim: i64,
    device: Device,
) -> Result<i64> {
    let size = head.weight.size();
    let &[vocab, h] = size.as_slice() else {
        return Err(Error::ShapeMismatch {
            op,
            name,
            expected: format!("[V, {hidden_dim}]"),
            got: size,
        });
    };
    if h != hidden_dim {
        return Err(Error::ShapeMismatch {
            op,
            name,
            expected: format!("[V, {hidden_dim}]"),
            got: size,
        });
    }
    compute_kind(op, name, head.weight)?;
    check_device(op, name, head.weight, device)?;
    if let Some(b) = head.bias {
        check_shape(op, "bias", b, &[vocab], "[V] =", device)?;
        compute_kind(op, "bias", b)?;
    }
    if vocab < 2 {
        return Err(Error::VocabTooSmall { op, vocab });
    }
    Ok(vocab)
}

impl<'a> Problem<'a> {
    fn new(
        op: &'static str,
        hidden: &Tensor,
        head: LinearHead<'a>,
        reference: Option<Reference<'a>>,
        labels: &Tensor,
    ) -> Result<Self> {
        let size = hidden.size();
        if !(size.len() == 2 || size.len() == 3) {
            return Err(Error::ShapeMismatch {
                op,
                name: "hidden",
                expected: "[N, H] or [B, T, H]".to_string(),
                got: size,
            });
        }
        let kind = compute_kind(op, "hidden", hidden)?;
        let device = hidden.device();
        let lead = size[..size.len() - 1].to_vec();
        let hidden_dim = size[size.len() - 1];
        let vocab = check_head(op, "weight", &head, hidden_dim, device)?;
        check_shape(op, "labels", labels, &lead, "the leading shape of hidden", device)?;
        match reference {
            Some(Reference::Head { hidden: rh, head: rhead }) => {
                let rsize = rh.size();
                let rdim = rsize.last().copied().unwrap_or(0);
                check_leading(op, "ref_hidden", rh, &lead)?;
                compute_kind(op, "ref_hidden", rh)?;
                check_device(op, "ref_hidden", rh, device)?;
                let rv = check_head(op, "ref_weight", &rhead, rdim, device)?;
                if rv != vocab {
                    return Err(Error::ShapeMismatch {
                        op,
                        name: "ref_weight",
                        expected: format!("[{vocab}, {rdim}] (the policy's vocabulary)"),
                        got: rhead.weight.size(),
                    });
                }
            }
            Some(Reference::Logits(rl)) => {
                let mut expected = lead.clone();
                expected.push(vocab);
                check_shape(
                    op,
                    "ref_logits",
                    rl,
                    &expected,
                    "[leading shape of hidden, V] =",
                    device,
                )?;
                compute_kind(op, "ref_logits", rl)?;
            }
            None => {}
        }
        let hidden = hidden.f_reshape([-1, hidden_dim])?;
        let labels = as_ids(op, "labels", labels)?.f_reshape([-1])?;
        let active = Tensor::f_zeros_like(&labels)?.f_to_kind(Kind::Bool)?;
        Ok(Problem {
            op,
            lead,
            kind,
            vocab,
            hidden,
            head,
            reference,
            labels,
            neg: None,
            active,
            count: 0,
        })
    }

    /// Sets the active rows and checks their labels.
    fn activate(&mut self, active: Tensor) -> Result<()> {
        self.active = active.f_reshape([-1])?;
        self.count =
            count_and_check_ids(self.op, "labels", &self.labels, &self.active, self.vocab)?;
        Ok(())
    }

    fn requires_grad(&self) -> bool {
        self.hidden.requires_grad()
            || self.head.weight.requires_grad()
            || self.head.bias.is_some_and(Tensor::requires_grad)
    }

    /// Runs the chunked loss. `fused` is the kernel flavour used when the backend resolves to
    /// the fused kernels (CPU f32 hidden states).
    fn run(
        &self,
        loss: &dyn RowLoss,
        fused: FusedChunk<'_>,
        buffers: usize,
        settings: (TokenBackend, NonFinitePolicy, Reduction),
        opts: &FusedLinearOptions,
        metrics: &dyn Fn(&Rows, &Tensor, &mut MetricSink) -> Result<()>,
    ) -> Result<LossOutput> {
        let (backend, policy, reduction) = settings;
        let op = self.op;
        let kind = self.kind;
        let device = self.hidden.device();
        let scalar = match reduction {
            Reduction::Sum | Reduction::Mean | Reduction::BatchMean => true,
            Reduction::None | Reduction::PerSequence => false,
            _ => false,
        };
        if !scalar {
            return Err(Error::InvalidConfig {
                op,
                name: "reduction",
                reason: format!(
                    "{reduction:?}: fused-linear losses differentiate a scalar (Sum, Mean or \
                     BatchMean); per-token losses come back detached in `per_example`"
                ),
            });
        }
        let use_kernel = kernel::use_kernel(op, backend, &self.hidden)?;
        let sel = RowSelection::new(&self.active, self.count)?;
        let n = sel.len();
        let h_sel = sel.rows(&self.hidden)?;
        let h = h_sel.f_detach()?.f_to_kind(kind)?;
        let w = self.head.weight.f_detach()?.f_to_kind(kind)?;
        let wt = w.f_tr()?;
        let bias = match self.head.bias {
            Some(b) => Some(b.f_detach()?.f_to_kind(kind)?),
            None => None,
        };
        let labels = sel.rows(&self.labels)?;
        let neg = match &self.neg {
            Some(neg) => Some(sel.rows(neg)?),
            None => None,
        };
        let ref_rows = match self.reference {
            Some(Reference::Head { hidden: rh, head: rhead }) => {
                let rdim = rh.size().last().copied().unwrap_or(0);
                let rh = sel.rows(&rh.f_detach()?.f_reshape([-1, rdim])?)?.f_to_kind(kind)?;
                let rw = rhead.weight.f_detach()?.f_to_kind(kind)?.f_tr()?;
                let rb = match rhead.bias {
                    Some(b) => Some(b.f_detach()?.f_to_kind(kind)?),
                    None => None,
                };
                Some(RefRows::Head(rh, rw, rb))
            }
            Some(Reference::Logits(rl)) => {
                // Rows are gathered chunk by chunk (never all active rows at once).
                let rl = rl.f_detach()?.f_reshape([-1, self.vocab])?;
                Some(RefRows::Logits(rl, sel.indices(device)?))
            }
            None => None,
        };
        let need_h = self.hidden.requires_grad();
        let need_w = self.head.weight.requires_grad();
        let need_b = self.head.bias.is_some_and(Tensor::requires_grad);
        let need_grad = self.requires_grad();
        let g_h = if need_h { Some(Tensor::f_zeros_like(&h)?) } else { None };
        let mut g_w = if need_w { Some(Tensor::f_zeros_like(&w)?) } else { None };
        let mut g_b =
            if need_b { Some(Tensor::f_zeros([self.vocab], (kind, device))?) } else { None };
        let chunk = opts.chunk(self.vocab, buffers);
        // One logits buffer (and one for the reference) reused by every chunk: the kernel
        // overwrites the logits with their gradient in place.
        let cap = chunk.min(n.max(1));
        let mut zbuf = if use_kernel { Some(ChunkBuf::new(cap, self.vocab)?) } else { None };
        let zobuf = if use_kernel && ref_rows.is_some() {
            Some(ChunkBuf::new(cap, self.vocab)?)
        } else {
            None
        };
        let mut values = Vec::new();
        let mut all_metrics = Metrics::new();
        let _guard = tch::no_grad_guard();
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let h_c = h.f_narrow(0, start, len)?;
            let labels_c = labels.f_narrow(0, start, len)?;
            let neg_c = match &neg {
                Some(neg) => Some(neg.f_narrow(0, start, len)?),
                None => None,
            };
            let z_c = match &zbuf {
                Some(buf) => {
                    let z = buf.view(len)?;
                    let _ = h_c.f_mm_out(&z, &wt)?;
                    z
                }
                None => h_c.f_mm(&wt)?,
            };
            if let Some(b) = &bias {
                let mut z = z_c.shallow_clone();
                let _ = z.f_add_(b)?;
            }
            let zo_c = match &ref_rows {
                Some(r) => Some(r.chunk(start, len, zobuf.as_ref(), kind)?),
                None => None,
            };
            let mut sink = MetricSink::default();
            let fused_out = match zbuf.as_mut() {
                Some(buf) => fused.run(
                    op,
                    buf,
                    &z_c,
                    zo_c.as_ref(),
                    &labels_c,
                    neg_c.as_ref(),
                    need_grad,
                    &mut sink,
                )?,
                None => None,
            };
            let (value, g_c) = match fused_out {
                Some(value) => (value, need_grad.then(|| z_c.shallow_clone())),
                None => {
                    // Composite or closed form (also the fallback when the kernel rejected a row
                    // as non-finite; the chunk's logits are then intact).
                    sink = MetricSink::default();
                    let to_flat = |r: i64| sel.flat_index(start + r);
                    let all_finite =
                        check_finite_rows(op, "logits", &z_c, &to_flat, &self.lead, policy)?;
                    if let Some(zo) = &zo_c {
                        check_finite_rows(op, "ref_logits", zo, &to_flat, &self.lead, policy)?;
                    }
                    let mut rows = Rows::new(z_c.shallow_clone(), zo_c, labels_c);
                    rows.all_finite = all_finite;
                    rows.neg = neg_c;
                    let (value, g_c) = if need_grad {
                        let ones = Tensor::f_ones([len], (kind, device))?;
                        let (value, g_c) = if backend == TokenBackend::Composite {
                            // Differentiates the composite graph of this chunk (grad mode on).
                            tch::with_grad(|| row_loss_and_grad(loss, &rows, &ones, backend))?
                        } else {
                            row_loss_and_grad(loss, &rows, &ones, TokenBackend::ClosedForm)?
                        };
                        (value, Some(g_c))
                    } else {
                        (loss.closed_form(&rows, false)?.0, None)
                    };
                    metrics(&rows, &value, &mut sink)?;
                    (value, g_c)
                }
            };
            if let Some(g_c) = &g_c {
                if let Some(g_h) = &g_h {
                    // Written in place into the rows of g_h (a contiguous view).
                    let out = g_h.f_narrow(0, start, len)?;
                    let _ = g_c.f_mm_out(&out, &w)?;
                }
                if let Some(g_w) = &mut g_w {
                    // grad_W += G_cᵀ·h_c, accumulated inside the GEMM.
                    let _ = g_w.f_addmm_(&g_c.f_tr()?, &h_c)?;
                }
                if let Some(g_b) = &mut g_b {
                    let _ = g_b.f_add_(&g_c.f_sum_dim_intlist(0, false, kind)?)?;
                }
            }
            all_metrics.merge(&sink.finish()?);
            values.push(value);
            start += len;
        }
        drop(_guard);
        drop(zbuf);
        drop(zobuf);
        let row_values = if values.is_empty() {
            Tensor::f_zeros([0], (kind, device))?
        } else {
            Tensor::f_cat(&values, 0)?.f_to_kind(kind)?
        };
        let per_example = sel.scatter(&row_values)?.f_reshape(self.lead.as_slice())?;
        let value = row_values.f_sum(Kind::Double)?.f_to_kind(kind)?;
        // Surrogate carrying the injected gradients.
        let mut s: Option<Tensor> = None;
        let mut add = |t: Tensor| -> Result<()> {
            s = Some(match s.take() {
                None => t,
                Some(acc) => acc.f_add(&t)?,
            });
            Ok(())
        };
        if let Some(g_h) = &g_h {
            let h_graph = h_sel.f_to_kind(kind)?.f_reshape([-1])?;
            add(g_h.f_reshape([-1])?.f_dot(&h_graph)?)?;
        }
        if let Some(g_w) = &g_w {
            let w_graph = self.head.weight.f_to_kind(kind)?.f_reshape([-1])?;
            add(g_w.f_reshape([-1])?.f_dot(&w_graph)?)?;
        }
        if let (Some(g_b), Some(b)) = (&g_b, self.head.bias) {
            add(g_b.f_dot(&b.f_to_kind(kind)?)?)?;
        }
        let sum = match s {
            Some(s) => value.f_add(&s.f_sub(&s.f_detach()?)?)?,
            None => value,
        };
        let count = self.count;
        let loss = match reduction {
            Reduction::Mean => {
                sum.f_mul_scalar(if count > 0 { 1.0 / count as f64 } else { 0.0 })?
            }
            Reduction::BatchMean => {
                let b = self.lead[0];
                sum.f_mul_scalar(if b > 0 { 1.0 / b as f64 } else { 0.0 })?
            }
            _ => sum.shallow_clone(),
        };
        Ok(LossOutput {
            loss,
            per_example,
            parts: vec![LossPart { name: "tokens", sum, count: count as f64, weight: 1.0 }],
            metrics: all_metrics,
        })
    }
}

/// The reference side of a fused-linear TNT problem, restricted to the active rows.
enum RefRows {
    /// Active reference hidden states `[n, H°]`, the head transposed `[H°, V]`, the bias.
    Head(Tensor, Tensor, Option<Tensor>),
    /// Precomputed reference logits `[N, V]` and the indices of the active rows.
    Logits(Tensor, Tensor),
}

impl RefRows {
    /// The reference logits of active rows `start .. start + len`, in `kind` (into `buf` when
    /// one is given).
    fn chunk(&self, start: i64, len: i64, buf: Option<&ChunkBuf>, kind: Kind) -> Result<Tensor> {
        match self {
            RefRows::Head(rh, rw, rb) => {
                let rh_c = rh.f_narrow(0, start, len)?;
                let zo = match buf {
                    Some(b) => {
                        let zo = b.view(len)?;
                        let _ = rh_c.f_mm_out(&zo, rw)?;
                        zo
                    }
                    None => rh_c.f_mm(rw)?,
                };
                if let Some(b) = rb {
                    let mut z = zo.shallow_clone();
                    let _ = z.f_add_(b)?;
                }
                Ok(zo)
            }
            RefRows::Logits(rl, idx) => {
                let idx_c = idx.f_narrow(0, start, len)?;
                match buf {
                    Some(b) if rl.f_kind()? == Kind::Float => {
                        let zo = b.view(len)?;
                        let _ = rl.f_index_select_out(&zo, 0, &idx_c)?;
                        Ok(zo)
                    }
                    _ => Ok(rl.f_index_select(0, &idx_c)?.f_to_kind(kind)?),
                }
            }
        }
    }
}

/// Which fused kernel evaluates the chunks of a fused-linear loss on the kernel backend.
#[derive(Clone, Copy)]
enum FusedChunk<'a> {
    /// Cross-entropy: [`amend_kernels::selected_logp`].
    Nll,
    /// TNT: [`amend_kernels::tnt`].
    Tnt(&'a TntConfig),
}

impl FusedChunk<'_> {
    /// Metrics, then the kernel over one chunk of active rows whose logits are in `buf`
    /// (`z` is the same storage as a tensor): the loss values `[len]` are returned and, with
    /// `grad`, the logits are overwritten by `∂ℓ/∂z`. `None` (nothing written) when the kernel
    /// rejected a row as non-finite.
    #[allow(clippy::too_many_arguments)]
    fn run(
        self,
        op: &'static str,
        buf: &mut ChunkBuf,
        z: &Tensor,
        zo: Option<&Tensor>,
        labels: &Tensor,
        neg: Option<&Tensor>,
        grad: bool,
        sink: &mut MetricSink,
    ) -> Result<Option<Tensor>> {
        let len = z.size()[0];
        let vocab = usize::try_from(z.size()[1]).unwrap_or(0);
        let y = CpuSlice::<i64>::new(labels, op, "labels")?;
        let mut loss = CpuBuf::empty(&[len])?;
        let mut tnt_stats = None;
        let result = match self {
            FusedChunk::Nll => {
                let hit = kernel::argmax(z)?.f_eq_tensor(labels)?.f_sum(Kind::Float)?;
                sink.add("mean_token_accuracy", &hit, len as f64)?;
                let cfg = SelectedLogpConfig::default()
                    .with_ignore_index(None)
                    .with_threads(kernel::threads());
                let zs = buf.rows_mut(len);
                let io = if grad { LogitsIo::in_place(zs) } else { LogitsIo::value(zs) };
                let out = SelectedLogpOut::new(loss.as_mut_slice());
                amend_kernels::selected_logp(io, vocab, y.as_slice(), None, &cfg, out)
            }
            FusedChunk::Tnt(cfg) => {
                let (Some(zo), Some(neg)) = (zo, neg) else {
                    return Err(Error::InvalidInput {
                        op,
                        name: "ref_logits",
                        reason: "internal: the TNT chunk has no reference or weights".into(),
                    });
                };
                let signs = neg.f_to_kind(Kind::Float)?.f_mul_scalar(-2.0)?.f_add_scalar(1.0)?;
                let ws = CpuSlice::<f32>::new(&signs, op, "weights")?;
                let zos = CpuSlice::<f32>::new(zo, op, "ref_logits")?;
                let kcfg = tnt_kernel_config(cfg);
                let zs = buf.rows_mut(len);
                let io = if grad { LogitsIo::in_place(zs) } else { LogitsIo::value(zs) };
                let (zo, y, w) = (zos.as_slice(), y.as_slice(), ws.as_slice());
                let out = loss.as_mut_slice();
                if cfg.metrics {
                    // In place, the kernel takes each row's statistics before its gradient
                    // overwrites the logits: still one sweep.
                    let mut rows = vec![TntRowStats::INACTIVE; out.len()];
                    let r =
                        amend_kernels::tnt_with_stats(io, vocab, zo, y, w, &kcfg, out, &mut rows);
                    if r.is_ok() {
                        let all = neg.f_ones_like()?.f_to_kind(Kind::Bool)?;
                        tnt_stats = Some(TntKernelStats::from_rows(&rows, labels, neg, &all)?);
                    }
                    r
                } else {
                    amend_kernels::tnt(io, vocab, Some(zo), y, w, &kcfg, out)
                }
            }
        };
        match result {
            Ok(_) => {
                let values = loss.into_tensor();
                if let Some(stats) = tnt_stats {
                    stats.record(&values, sink)?;
                }
                Ok(Some(values))
            }
            Err(KernelError::NonFiniteRow { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Hidden-state cross-entropy (NLL) through the LM head, chunked, with `[N, V]` never
/// materialised.
///
/// ```text
/// z = h·Wᵀ + b          (per chunk of active rows; masked rows are dropped before the GEMM)
/// ℓ_i = −log softmax(z_i)_{y_i}      on label ≠ ignore_index ∧ loss_mask
/// ∂/∂h = G·W,  ∂/∂W = Gᵀ·h (accumulated in the GEMM),  ∂/∂b = Σ_i G_i,   G = p − e_y
/// ```
///
/// Value and gradients equal [`nll_loss`](super::nll_loss) on the full logits `h·Wᵀ + b`. Only
/// the scalar reductions (`Sum`, `Mean`, `BatchMean`) are supported: the head's gradient is a sum
/// over rows, so per-token upstream weights cannot be applied after the call; `per_example`
/// holds the token losses, detached. Gradients are injected (first order only); the
/// [`LossPart`] `sum` carries them too, so [`LossOutput::normalized_by`] works.
///
/// The arithmetic is f32 (f64 for f64 hidden states); a bf16 head is upcast once per call.
/// `cfg.backend = Composite` recomputes each chunk under autograd instead of the closed form.
///
/// # Shapes
///
/// * `hidden`: `[N, H]` or `[B, T, H]`; `labels` and `loss_mask`: the leading shape.
/// * `BatchMean` divides by the leading dimension of `hidden` (`B`, or `N` for `[N, H]`).
/// * `head.weight`: `[V, H]`, `head.bias`: `[V]`.
///
/// # Errors
///
/// As [`nll_loss`](super::nll_loss), plus [`Error::InvalidConfig`] for `None` /
/// `PerSequence` reductions.
///
/// # Example
///
/// ```
/// use amend_losses::token::{FusedLinearOptions, LinearHead, NllConfig, fused_linear_nll_loss};
/// use tch::{Kind, Tensor};
///
/// tch::manual_seed(0);
/// let h = Tensor::randn([6, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
/// let w = Tensor::randn([11, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::from_slice(&[1i64, 4, -100, 10, 0, 3]);
/// let opts = FusedLinearOptions::default().with_chunk_rows(2);
/// let out = fused_linear_nll_loss(&h, LinearHead::new(&w), &labels, None, &NllConfig::default(), &opts)?;
/// out.loss.backward();
/// assert_eq!(out.count(), 5.0);
/// assert_eq!(w.grad().size(), [11, 8]);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn fused_linear_nll_loss(
    hidden: &Tensor,
    head: LinearHead<'_>,
    labels: &Tensor,
    loss_mask: Option<&Tensor>,
    cfg: &NllConfig,
    opts: &FusedLinearOptions,
) -> Result<LossOutput> {
    const OP: &str = "fused_linear_nll_loss";
    cfg.validate()?;
    let mut problem = Problem::new(OP, hidden, head, None, labels)?;
    let mut active = problem.labels.f_ne(cfg.ignore_index)?;
    if let Some(m) = loss_mask {
        check_shape(
            OP,
            "loss_mask",
            m,
            &problem.lead,
            "the leading shape of hidden",
            hidden.device(),
        )?;
        active = active.f_logical_and(&as_mask(OP, "loss_mask", m)?.f_reshape([-1])?)?;
    }
    problem.activate(active)?;
    problem.run(
        &NllRows,
        FusedChunk::Nll,
        1,
        (cfg.backend, cfg.non_finite, cfg.reduction),
        opts,
        &|rows, _, sink| nll_metrics(rows, sink),
    )
}

/// Hidden-state TNT (TNFF, TNRR, TNRF, TNFLL, TNRLL) through the LM head, chunked, with
/// `[N, V]` never materialised.
///
/// The reference logits come chunk by chunk from the reference hidden states and head
/// ([`Reference::Head`]), or from precomputed logits / log-probabilities
/// ([`Reference::Logits`]). Rows with `w = 0` are dropped before either GEMM. Value and
/// gradients equal [`tnt_loss`](super::tnt_loss) on the full logits; metrics are the same.
///
/// ```text
/// z = h·Wᵀ + b,  z° = h°·W°ᵀ + b°  (no grad)      ℓ = TNT(z, z°, y, w)      (see tnt_loss)
/// ∂/∂h = G·W,  ∂/∂W = Gᵀ·h,  ∂/∂b = Σ_i G_i
/// ```
///
/// # Shapes
///
/// * `hidden`: `[N, H]` or `[B, T, H]`; `labels`: the leading shape; `weights`: the leading
///   shape (`[1, N]` or `[N, 1]` for `[N, H]`, since [`TokenWeights`] are 2-D).
/// * `BatchMean` divides by the leading dimension of `hidden` (`B`, or `N` for `[N, H]`).
/// * `head.weight`: `[V, H]`; reference: `[.., H°]` with a `[V, H°]` head, or `[.., V]` logits.
///
/// # Errors
///
/// As [`tnt_loss`](super::tnt_loss), plus [`Error::InvalidConfig`] for `None` /
/// `PerSequence` reductions.
///
/// # Example
///
/// ```
/// use amend_losses::token::{
///     FusedLinearOptions, LinearHead, Reference, TntConfig, TntVariant, TokenWeights, fused_linear_tnt_loss,
/// };
/// use tch::{Kind, Tensor};
///
/// tch::manual_seed(0);
/// let opts = (Kind::Float, tch::Device::Cpu);
/// let w0 = Tensor::randn([11, 8], opts);
/// let w = w0.copy().set_requires_grad(true);
/// let h = Tensor::randn([2, 3, 8], opts);
/// let labels = Tensor::from_slice(&[1i64, 4, 7, 10, 0, 3]).reshape([2, 3]);
/// let weights = TokenWeights::new(&Tensor::from_slice(&[1i64, -1, 1, 0, 1, -1]).reshape([2, 3]))?;
/// let reference = Reference::Head { hidden: &h, head: LinearHead::new(&w0) };
/// let cfg = TntConfig::new(TntVariant::Ff).with_alpha(1.0);
/// let out = fused_linear_tnt_loss(&h, LinearHead::new(&w), reference, &labels, &weights, &cfg, &FusedLinearOptions::default())?;
/// out.loss.backward();
/// assert_eq!(out.count(), 5.0);
/// // At step 0 (model = reference) the positive positions have KL 0 to the reference.
/// assert!(out.metrics.mean("tnt/pos_kl").unwrap().abs() < 1e-6);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn fused_linear_tnt_loss(
    hidden: &Tensor,
    head: LinearHead<'_>,
    reference: Reference<'_>,
    labels: &Tensor,
    weights: &TokenWeights,
    cfg: &TntConfig,
    opts: &FusedLinearOptions,
) -> Result<LossOutput> {
    const OP: &str = "fused_linear_tnt_loss";
    cfg.validate()?;
    cfg.check_dtype(OP, compute_kind(OP, "hidden", hidden)?)?;
    let mut problem = Problem::new(OP, hidden, head, Some(reference), labels)?;
    // TokenWeights are [B, T]; with [N, H] hidden states they may be [1, N] or [N, 1].
    let ws = weights.shape();
    let n: i64 = problem.lead.iter().product();
    let fits = ws == problem.lead || (problem.lead.len() == 1 && (ws == [1, n] || ws == [n, 1]));
    if !fits {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "weights",
            expected: format!(
                "the leading shape of hidden {:?} (or [1, N] for [N, H])",
                problem.lead
            ),
            got: ws,
        });
    }
    check_device(OP, "weights", weights.signs(), hidden.device())?;
    problem.neg = Some(weights.signs().f_reshape([-1])?.f_lt(0)?);
    problem.activate(weights.active_mask()?)?;
    let rows_loss = TntRows { variant: cfg.variant, alpha: cfg.alpha, eps: cfg.smoothing_eps };
    problem.run(
        &rows_loss,
        FusedChunk::Tnt(cfg),
        2,
        (cfg.backend, cfg.non_finite, cfg.reduction),
        opts,
        &|rows, value, sink| if cfg.metrics { tnt_metrics(rows, value, sink) } else { Ok(()) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rule_follows_the_memory_budget() {
        let opts = FusedLinearOptions::default();
        // 64 MiB / (50257 · 4 B) = 333 rows → 256 for one buffer (CE), 128 for two (TNT).
        assert_eq!(opts.chunk(50257, 1), 256);
        assert_eq!(opts.chunk(50257, 2), 128);
        // Small vocabularies are capped at 1024 rows, huge ones floored at 128.
        assert_eq!(opts.chunk(1000, 1), 1024);
        assert_eq!(opts.chunk(1 << 24, 1), 128);
        assert_eq!(opts.clone().with_chunk_rows(7).chunk(50257, 2), 7);
        assert_eq!(opts.with_memory_budget_bytes(32 << 20).chunk(32000, 1), 256);
    }
}
