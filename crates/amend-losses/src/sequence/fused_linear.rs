//! [`SeqLogps`] from hidden states and the LM head without materialising `[N, V]` logits.
//!
//! The logits of the scored rows are produced chunk by chunk (`h_c · Wᵀ + b` into one reused
//! `[C, V]` buffer). Because a sequence-level loss needs the sums of *all* sequences before its
//! gradient with respect to them is known (a DPO pair couples two sequences through a sigmoid),
//! the path has two passes:
//!
//! 1. [`seq_logps_fused_linear`] computes the values (no graph) and returns them with a
//!    per-token leaf that the loss is built on;
//! 2. [`FusedLinearSeqLogps::f_attach`] reads `u = ∂loss/∂lp` from that leaf, recomputes each
//!    chunk's logits, forms `G_c = u·(onehot(y) − softmax)` in place, accumulates
//!    `∂/∂h = G_c·W` and `∂/∂W += G_cᵀ·h_c` (inside the GEMM, `addmm_`) and injects both at `h`
//!    and `W` through a surrogate whose value is the loss (`docs/losses-sequence.md`, and
//!    `kernels-and-performance.md` §3.2 and §4 of the design specs).
//!
//! Cost: four `[N, H]×[H, V]`-sized GEMMs (forward, recomputation, `∂h`, `∂W`) against three for
//! the full-logits path with autograd; memory: one `[C, V]` buffer, the `[V, H]` weight gradient
//! and `[N, H]` activations instead of several `[N, V]` tensors.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use amend_kernels::{KernelError, LogitsIo, SelectedLogpConfig, SelectedLogpOut};

use super::common::{
    check_device, check_float, check_rank, check_shape, compute_kind, with_setters,
};
use super::seq_logps::{
    ActiveRows, SeqLogps, SeqLogpsConfig, TokenStats, active_rows, assemble, check_lp_finite,
    token_stats,
};
use crate::bridge::{ChunkBuf, CpuBuf, CpuSlice};
use crate::token::kernel;
use crate::token::{FusedLinearOptions, NonFinitePolicy};
use crate::{Error, Result};

/// Options of the fused-linear path.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusedLinearConfig {
    /// Chunking, shared with the token-level fused-linear losses: `chunk_rows` (default `None`:
    /// the largest power of two with `C · V · 4 bytes ≤ memory_budget_bytes`, clamped to
    /// `[128, 1024]`, which is 256 at `V = 50257`) and `memory_budget_bytes` (default 64 MiB;
    /// larger chunks cost memory, smaller ones re-read the head more often).
    pub chunking: FusedLinearOptions,
    /// The options shared with [`seq_logps`](super::seq_logps) (`token_stats`, `non_finite`;
    /// per-token log-probs are always returned on this path).
    pub logps: SeqLogpsConfig,
}

with_setters!(FusedLinearConfig {
    with_chunking => chunking: FusedLinearOptions,
    with_logps => logps: SeqLogpsConfig,
});

impl FusedLinearConfig {
    /// Sets a fixed number of rows per chunk.
    #[must_use]
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunking = self.chunking.with_chunk_rows(rows);
        self
    }

    /// The chunk size used for vocabulary `vocab` and `rows` scored rows.
    pub fn resolve_chunk(&self, vocab: i64, rows: i64) -> i64 {
        self.chunking.chunk(vocab, 1).min(rows.max(1))
    }
}

/// Output of [`seq_logps_fused_linear`]: the log-probs (values, on a leaf) and what
/// [`FusedLinearSeqLogps::f_attach`] needs to inject their gradient at the hidden states and the
/// head.
#[derive(Debug)]
pub struct FusedLinearSeqLogps {
    logps: SeqLogps,
    /// `[B, T−1]` leaf the per-token log-probs (and the sums) are computed from.
    leaf: Option<Tensor>,
    hidden: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    /// Scored rows of `hidden` (flattened `[B·T, H]`), compacted, in the compute kind.
    h_rows: Tensor,
    /// The head in the compute kind (`[V, H]`).
    w_kind: Tensor,
    b_kind: Option<Tensor>,
    active: ActiveRows,
    lse: Tensor,
    chunk: i64,
    kind: Kind,
    /// Chunks run on the fused kernel (CPU f32).
    use_kernel: bool,
}

impl FusedLinearSeqLogps {
    /// The log-probs. Build the loss on these (`sum`, `per_token`, or anything derived), then
    /// pass it to [`FusedLinearSeqLogps::f_attach`].
    pub fn logps(&self) -> &SeqLogps {
        &self.logps
    }

    /// Consumes the wrapper and returns the log-probs (they can no longer be attached).
    pub fn into_logps(self) -> SeqLogps {
        self.logps
    }

    /// The chunk size in rows.
    pub fn chunk_size(&self) -> i64 {
        self.chunk
    }

    /// Returns a tensor equal to `loss` whose backward pass also delivers, at `hidden`, the LM
    /// head weight and the bias, the gradient `loss` has through these log-probs.
    ///
    /// ```text
    /// u      = ∂loss/∂lp                               (one autograd query on the leaf)
    /// G_c    = u_c ⊙ (onehot(y_c) − softmax(h_c·Wᵀ + b))   per chunk, in place in one [C, V] buffer
    /// ∂h_c   = G_c · W        ∂W += G_cᵀ · h_c        ∂b += Σ_rows G_c
    /// out    = loss + (⟨∂h, h⟩ + ⟨∂W, W⟩ + ⟨∂b, b⟩) − (…).detach()
    /// ```
    ///
    /// The surrogate's inner products run in f32 (f64 for f64 inputs); for bf16 parameters the
    /// gradient reaches them through the cast, rounded once.
    ///
    /// `loss` may depend on anything else too (other log-probs, a retain term, other
    /// parameters); only its dependence on these log-probs is rerouted. Chain several
    /// `f_attach` calls when a loss uses several fused-linear outputs. Call `backward()` on the
    /// result, once; first order only (no double backward). If `loss` does not depend on these
    /// log-probs, or neither `hidden`, the head nor the bias requires grad, the result is `loss`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a non-scalar `loss`, [`Error::Tch`].
    pub fn f_attach(&self, loss: &Tensor) -> Result<Tensor> {
        if loss.numel() != 1 {
            return Err(Error::InvalidInput {
                op: "FusedLinearSeqLogps::f_attach",
                name: "loss",
                reason: format!("must be a scalar, got shape {:?}", loss.size()),
            });
        }
        let Some(leaf) = &self.leaf else { return Ok(loss.shallow_clone()) };
        if !loss.requires_grad() {
            return Ok(loss.shallow_clone());
        }
        let grads = Tensor::f_run_backward(&[loss], &[leaf], true, false)?;
        let Some(g) = grads.into_iter().next().filter(|g| g.defined()) else {
            return Ok(loss.shallow_clone());
        };
        let (g_h, g_w, g_b) = {
            let _guard = tch::no_grad_guard();
            let u = g.f_reshape([-1])?.f_index_select(0, &self.active.idx)?.f_to_kind(self.kind)?;
            self.backward_chunks(&u)?
        };
        let mut inj: Option<Tensor> = None;
        let mut add = |term: Tensor| -> Result<()> {
            let term = term.f_to_kind(loss.kind())?;
            inj = Some(match inj.take() {
                None => term,
                Some(t) => t.f_add(&term)?,
            });
            Ok(())
        };
        if self.hidden.requires_grad() {
            let (n_rows, h) =
                (self.hidden.numel() as i64 / self.w_kind.size()[1], self.w_kind.size()[1]);
            let full = Tensor::f_zeros([n_rows, h], (self.kind, g_h.device()))?.f_index_copy(
                0,
                &self.active.rows,
                &g_h,
            )?;
            add(full
                .f_reshape([-1])?
                .f_dot(&self.hidden.f_reshape([-1])?.f_to_kind(self.kind)?)?)?;
        }
        if self.weight.requires_grad() {
            add(g_w
                .f_reshape([-1])?
                .f_dot(&self.weight.f_reshape([-1])?.f_to_kind(self.kind)?)?)?;
        }
        if let Some(b) = self.bias.as_ref().filter(|b| b.requires_grad()) {
            add(g_b.f_dot(&b.f_to_kind(self.kind)?)?)?;
        }
        match inj {
            None => Ok(loss.shallow_clone()),
            Some(s) => Ok(loss.f_add(&s.f_sub(&s.f_detach()?)?)?),
        }
    }

    /// `(∂h_rows [N, H], ∂W [V, H], ∂b [V])` for per-row upstream gradients `u [N]`.
    fn backward_chunks(&self, u: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, h) = (self.h_rows.size()[0], self.h_rows.size()[1]);
        let v = self.w_kind.size()[0];
        let dev = self.h_rows.device();
        let g_h = Tensor::f_zeros([n, h], (self.kind, dev))?;
        let mut g_w = Tensor::f_zeros([v, h], (self.kind, dev))?;
        let mut g_b = Tensor::f_zeros([v], (self.kind, dev))?;
        let wt = self.w_kind.f_tr()?;
        // One [C, V] buffer for every chunk: a kernel buffer on the kernel path, a tensor else.
        let cap = self.chunk.min(n.max(1));
        let mut kbuf = if self.use_kernel { Some(ChunkBuf::new(cap, v)?) } else { None };
        let buf_t = match kbuf {
            Some(_) => None,
            None => Some(Tensor::f_empty([cap, v], (self.kind, dev))?),
        };
        let mut start = 0;
        while start < n {
            let c = self.chunk.min(n - start);
            let h_c = self.h_rows.f_narrow(0, start, c)?;
            let mut z = match (&buf_t, &kbuf) {
                (Some(t), _) => t.f_narrow(0, 0, c)?,
                (None, Some(b)) => b.view(c)?,
                (None, None) => Tensor::f_empty([c, v], (self.kind, dev))?,
            };
            let _ = h_c.f_mm_out(&z, &wt)?;
            if let Some(b) = &self.b_kind {
                let _ = z.f_add_(b)?;
            }
            let u_c = u.f_narrow(0, start, c)?;
            let y_c = self.active.targets.f_narrow(0, start, c)?;
            // z ← u·(onehot(y) − softmax(z)), in place: the kernel with row scale −u, or tch ops.
            let done = match kbuf.as_mut() {
                Some(b) => grad_chunk_kernel(b, c, &y_c, &u_c)?,
                None => false,
            };
            if !done {
                let lse_c = self.lse.f_narrow(0, start, c)?.f_unsqueeze(1)?;
                let (u_c, y_c) = (u_c.f_unsqueeze(1)?, y_c.f_unsqueeze(1)?);
                let _ = z.f_sub_(&lse_c)?;
                let _ = z.f_exp_()?;
                let _ = z.f_mul_(&u_c.f_neg()?)?;
                let _ = z.f_scatter_add_(1, &y_c, &u_c)?;
            }
            let _ = z.f_mm_out(&g_h.f_narrow(0, start, c)?, &self.w_kind)?;
            let _ = g_w.f_addmm_(&z.f_tr()?, &h_c)?;
            let _ = g_b.f_add_(&z.f_sum_dim_intlist([0i64].as_slice(), false, self.kind)?)?;
            start += c;
        }
        Ok((g_h, g_w, g_b))
    }
}

/// Overwrites the first `c` rows of `buf` (logits) with `u ⊙ (onehot(y) − softmax)` through the
/// fused kernel (row scale `−u`: rows with `u = 0` get exact zeros). `false` (nothing written)
/// when the kernel rejects a row as non-finite or a non-finite `u`.
fn grad_chunk_kernel(buf: &mut ChunkBuf, c: i64, targets: &Tensor, u: &Tensor) -> Result<bool> {
    const OP: &str = "FusedLinearSeqLogps::f_attach";
    let v = buf.view(c)?.size()[1];
    let scale = u.f_neg()?.f_to_kind(Kind::Float)?.f_contiguous()?;
    let ss = CpuSlice::<f32>::strict(&scale, OP, "row_scale")?;
    let ys = CpuSlice::<i64>::new(targets, OP, "input_ids")?;
    let cfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(kernel::threads());
    let mut loss = vec![0.0f32; usize::try_from(c).unwrap_or(0)];
    match amend_kernels::selected_logp(
        LogitsIo::in_place(buf.rows_mut(c)),
        usize::try_from(v).unwrap_or(0),
        ys.as_slice(),
        Some(ss.as_slice()),
        &cfg,
        SelectedLogpOut::new(&mut loss),
    ) {
        Ok(_) => Ok(true),
        Err(KernelError::NonFiniteRow { .. })
        | Err(KernelError::InvalidArg { name: "row_scale", .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Per-sequence log-probabilities from hidden states and the LM head, chunked over the scored
/// rows, never materialising `[N, V]` logits (the fused-linear path).
///
/// ```text
/// rows   = {(b, t) : completion_mask[b, t+1] = 1}          unscored rows dropped before the GEMM
/// z_c    = h_c · Wᵀ (+ b)                                  one [C, V] buffer, reused per chunk
/// lp_r   = z_r[y_r] − lse(z_r)                             y_r = input_ids[b, t+1]
/// S[b]   = Σ_{r ∈ b} lp_r,   n[b] = |{r ∈ b}|
/// ```
///
/// The returned values are those of [`seq_logps`](super::seq_logps) applied to
/// `hidden · Wᵀ + b`. Build the loss on [`FusedLinearSeqLogps::logps`], then back-propagate
/// [`FusedLinearSeqLogps::f_attach`]`(&loss)`: it delivers the gradients at `hidden`, `lm_head`
/// and `bias`. Arithmetic runs in f32 (f64 for f64 inputs); bf16 and f16 operands are upcast
/// and the weight gradient is accumulated in f32 before it is cast to the weight's kind.
///
/// # Shapes
///
/// * `hidden`: `[B, T, H]`, float
/// * `lm_head`: `[V, H]`, float (same kind as `hidden`)
/// * `bias`: `[V]` or `None`
/// * `input_ids`, `completion_mask`: `[B, T]`, as for [`seq_logps`](super::seq_logps)
///
/// # Errors
///
/// As [`seq_logps`](super::seq_logps), plus [`Error::ShapeMismatch`] and
/// [`Error::DtypeMismatch`] for the head and the bias.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{seq_logps_fused_linear, FusedLinearConfig};
/// use tch::{Device, Kind, Tensor};
///
/// tch::manual_seed(0);
/// let hidden = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let head = Tensor::randn([11, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let ids = Tensor::randint(11, [2, 5], (Kind::Int64, Device::Cpu));
/// let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 0, 1, 1, 1, 0]).view([2, 5]);
/// let fl = seq_logps_fused_linear(&hidden, &head, None, &ids, &mask, &FusedLinearConfig::default())?;
/// let loss = fl.logps().sum.neg().mean(Kind::Float); // any loss built on the log-probs
/// fl.f_attach(&loss)?.backward();
/// assert_eq!(head.grad().size(), vec![11, 8]);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn seq_logps_fused_linear(
    hidden: &Tensor,
    lm_head: &Tensor,
    bias: Option<&Tensor>,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    cfg: &FusedLinearConfig,
) -> Result<FusedLinearSeqLogps> {
    const OP: &str = "seq_logps_fused_linear";
    check_rank(OP, "hidden", hidden, 3, "[B, T, H]")?;
    check_float(OP, "hidden", hidden)?;
    check_rank(OP, "lm_head", lm_head, 2, "[V, H]")?;
    check_float(OP, "lm_head", lm_head)?;
    let (b, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
    let v = lm_head.size()[0];
    check_shape(OP, "lm_head", lm_head, &[v, h], || format!("[V, H] with H = {h} from `hidden`"))?;
    check_device(OP, "lm_head", lm_head, hidden.device())?;
    if let Some(bias) = bias {
        check_float(OP, "bias", bias)?;
        check_shape(OP, "bias", bias, &[v], || format!("[V] = [{v}]"))?;
        check_device(OP, "bias", bias, hidden.device())?;
    }
    let active = active_rows(OP, b, t, v, input_ids, completion_mask, hidden.device())?;
    let kind = compute_kind(hidden.kind());
    let tm1 = (t - 1).max(0);
    let n = active.rows.size()[0];
    let chunk = cfg.resolve_chunk(v, n);

    let _guard = tch::no_grad_guard();
    let h_rows = hidden.f_reshape([b * t, h])?.f_index_select(0, &active.rows)?.f_to_kind(kind)?;
    let w_kind = lm_head.f_detach()?.f_to_kind(kind)?;
    let b_kind = bias.map(|b| b.f_detach()?.f_to_kind(kind)).transpose()?;
    let wt = w_kind.f_tr()?;
    let lp_rows = Tensor::f_empty([n], (kind, hidden.device()))?;
    let lse = Tensor::f_empty([n], (kind, hidden.device()))?;
    let mut stats = cfg.logps.token_stats.then(TokenStats::default);
    let use_kernel = kernel::use_kernel(OP, cfg.logps.backend, hidden)?;
    if n > 0 {
        let buf = Tensor::f_empty([chunk, v], (kind, hidden.device()))?;
        let mut start = 0;
        while start < n {
            let c = chunk.min(n - start);
            let mut z = buf.f_narrow(0, 0, c)?;
            let _ = h_rows.f_narrow(0, start, c)?.f_mm_out(&z, &wt)?;
            if let Some(bk) = &b_kind {
                let _ = z.f_add_(bk)?;
            }
            let y_c = active.targets.f_narrow(0, start, c)?;
            if let Some(s) = stats.as_mut() {
                s.merge(&token_stats(&z, &y_c)?);
            }
            let mut lse_c = lse.f_narrow(0, start, c)?;
            let mut lp_c = lp_rows.f_narrow(0, start, c)?;
            if !(use_kernel && value_chunk_kernel(OP, &z, &y_c, &mut lse_c, &mut lp_c)?) {
                let lse_z = z.f_logsumexp([1i64].as_slice(), false)?;
                let zy = z.f_gather(1, &y_c.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?;
                lse_c.f_copy_(&lse_z)?;
                lp_c.f_copy_(&zy.f_sub(&lse_z)?)?;
            }
            start += c;
        }
    }
    if cfg.logps.non_finite == NonFinitePolicy::Error {
        check_lp_finite(OP, &lp_rows, &active, tm1, |r| {
            let z = h_rows.f_get(r)?.f_unsqueeze(0)?.f_mm(&wt)?.f_squeeze_dim(0)?;
            Ok(match &b_kind {
                Some(bk) => z.f_add(bk)?,
                None => z,
            })
        })?;
    }
    let (_, per_token) = assemble(&lp_rows, &active, b, tm1)?;
    drop(_guard);

    let needs_grad = hidden.requires_grad()
        || lm_head.requires_grad()
        || bias.is_some_and(|b| b.requires_grad());
    let leaf = needs_grad.then(|| per_token.shallow_clone().set_requires_grad(true));
    let per_token = leaf.as_ref().map_or_else(|| per_token.shallow_clone(), |l| l.shallow_clone());
    let sum = per_token.f_sum_dim_intlist([1i64].as_slice(), false, kind)?;
    let logps = SeqLogps {
        sum,
        len: active.len.shallow_clone(),
        per_token: Some(per_token),
        mask: Some(active.mask.shallow_clone()),
        stats,
    };
    Ok(FusedLinearSeqLogps {
        logps,
        leaf,
        hidden: hidden.shallow_clone(),
        weight: lm_head.shallow_clone(),
        bias: bias.map(Tensor::shallow_clone),
        h_rows,
        w_kind,
        b_kind,
        active,
        lse,
        chunk,
        kind,
        use_kernel,
    })
}

/// `lse` and `lp = z_y − lse` of a chunk `z [c, V]` by the fused kernel (value only, one `exp`
/// per element, written straight into the output rows). `false` when the kernel rejected a row
/// as non-finite (nothing is written; the caller uses tch ops).
fn value_chunk_kernel(
    op: &'static str,
    z: &Tensor,
    targets: &Tensor,
    lse: &mut Tensor,
    lp: &mut Tensor,
) -> Result<bool> {
    let c = z.size()[0];
    let vocab = usize::try_from(z.size()[1]).unwrap_or(0);
    let zs = CpuSlice::<f32>::strict(z, op, "logits")?;
    let ys = CpuSlice::<i64>::new(targets, op, "input_ids")?;
    let mut loss = CpuBuf::empty(&[c])?;
    let mut lse_b = CpuBuf::empty(&[c])?;
    let mut lp_b = CpuBuf::empty(&[c])?;
    let cfg = SelectedLogpConfig::default().with_ignore_index(None).with_threads(kernel::threads());
    let out = SelectedLogpOut::new(loss.as_mut_slice())
        .with_lse(lse_b.as_mut_slice())
        .with_logp(lp_b.as_mut_slice());
    match amend_kernels::selected_logp(
        LogitsIo::value(zs.as_slice()),
        vocab,
        ys.as_slice(),
        None,
        &cfg,
        out,
    ) {
        Ok(_) => {
            lse.f_copy_(&lse_b.into_tensor())?;
            lp.f_copy_(&lp_b.into_tensor())?;
            Ok(true)
        }
        Err(KernelError::NonFiniteRow { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
