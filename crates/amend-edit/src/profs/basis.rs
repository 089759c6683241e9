//! The pure-math half of ProFS: difference matrix, centering, SVD, rank checks and the basis of
//! the projected subspace (spec A.3 steps 5–8). No model involved.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::{BasisOptions, Centering, RankPolicy};
use crate::report::EditWarning;
use crate::util::to_f64_vec;
use crate::{Error, Result};

/// The projected subspace of one layer.
///
/// `basis` holds `V_k` (`[hidden, k_eff]`, orthonormal columns, in the SVD dtype); the projector
/// `P = V_k V_kᵀ` is never materialised by the edit (see [`LayerBasis::projector`] for tests).
#[derive(Debug)]
pub struct LayerBasis {
    /// The layer.
    pub layer: usize,
    /// `V_k`, `[hidden, k_eff]`; `None` when the layer is degenerate and was skipped (PF-8).
    pub basis: Option<Tensor>,
    /// Singular values of the centred difference matrix, descending (`min(N, D)` of them).
    pub singular_values: Vec<f64>,
    /// The rank asked for.
    pub k: usize,
    /// The rank used (`k`, or `r_eff` under [`RankPolicy::Clamp`]; 0 when skipped).
    pub k_eff: usize,
    /// Numerical rank `#{σ_j > τ·σ₁}` with `τ = max(N, D)·ε`.
    pub r_eff: usize,
    /// `Σ_{j ≤ k_eff} σ_j² / Σ_j σ_j²` (0 for a zero matrix).
    pub explained_energy: f64,
    /// The layer was degenerate and left unedited (only with `allow_degenerate_layers`).
    pub skipped: bool,
    /// Warnings issued for this layer.
    pub warnings: Vec<EditWarning>,
}

impl LayerBasis {
    /// The projector `P = V_k V_kᵀ` (`[hidden, hidden]`), for inspection and tests; `None` for a
    /// skipped layer.
    ///
    /// # Errors
    /// [`Error::Tch`].
    pub fn projector(&self) -> Result<Option<Tensor>> {
        match &self.basis {
            None => Ok(None),
            Some(v) => Ok(Some(v.f_matmul(&v.f_tr()?)?)),
        }
    }

    /// A serialisable summary (what the report and manifest store).
    pub fn summary(&self) -> LayerSummary {
        let s1 = self.singular_values.first().copied().unwrap_or(0.0);
        let sk = self.singular_values.get(self.k.saturating_sub(1)).copied().unwrap_or(0.0);
        LayerSummary {
            layer: self.layer,
            k: self.k,
            k_eff: self.k_eff,
            r_eff: self.r_eff,
            sigma_top_k: self.singular_values.iter().take(self.k).copied().collect(),
            singular_values: self.singular_values.clone(),
            sigma_k_over_sigma_1: if s1 > 0.0 { sk / s1 } else { 0.0 },
            explained_energy: self.explained_energy,
            skipped: self.skipped,
            directions: Vec::new(),
        }
    }

    /// The diagnostics of each basis direction `v_j` (`j < k_eff`): its share `σ_j² / Σ_i σ_i²`
    /// of the difference matrix's energy, and the "logit lens" view the reference logs, the
    /// `top` tokens with the largest and the smallest entries of `W_U v_j` (`unembedding` is
    /// the LM head `[vocab, hidden]`; no final norm is applied). A singular vector has no sign,
    /// so both ends are reported: when the subspace is the unwanted one, one end lists unwanted
    /// tokens. Empty for a skipped layer.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `unembedding` is not `[vocab, hidden]`; [`Error::Tch`].
    ///
    /// # Example
    ///
    /// ```
    /// use amend_edit::profs::{profs_basis, BasisOptions, Centering};
    /// use tch::Tensor;
    /// // Pairs that differ along the first hidden axis only.
    /// let xp = Tensor::from_slice(&[2.0f32, 1.0, 3.0, 0.5, 1.0, 1.0]).view([3, 2]);
    /// let xn = Tensor::from_slice(&[0.0f32, 1.0, 0.5, 0.5, 1.0, 1.0]).view([3, 2]);
    /// let opts = BasisOptions::new(1).with_centering(Centering::None);
    /// let b = profs_basis(&xp, &xn, 0, &opts)?;
    /// // A 3-token vocabulary: token 2 reads the first axis, token 0 its opposite.
    /// let w_u = Tensor::from_slice(&[-1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0]).view([3, 2]);
    /// let d = &b.directions(&w_u, 1)?[0];
    /// assert!(d.energy > 0.999); // all the energy is on that axis
    /// let ends = [d.top_tokens[0], d.bottom_tokens[0]];
    /// assert!(ends == [2, 0] || ends == [0, 2]); // the two ends of the unwanted axis
    /// # Ok::<(), amend_edit::Error>(())
    /// ```
    pub fn directions(&self, unembedding: &Tensor, top: usize) -> Result<Vec<DirectionSummary>> {
        let Some(v) = &self.basis else { return Ok(Vec::new()) };
        let (hidden, k) = (v.size()[0], v.size()[1]);
        let us = unembedding.size();
        if us.len() != 2 || us[1] != hidden {
            return Err(Error::ShapeMismatch {
                op: "LayerBasis::directions",
                name: "unembedding",
                expected: vec![-1, hidden],
                got: us,
            });
        }
        let _guard = tch::no_grad_guard();
        // [vocab, k] in f32 (f64 for an f64 head): only the ranking and rough scores matter.
        let kind = if unembedding.kind() == tch::Kind::Double {
            tch::Kind::Double
        } else {
            tch::Kind::Float
        };
        let scores = unembedding.f_to_kind(kind)?.f_matmul(&v.f_to_kind(kind)?)?;
        let total: f64 = self.singular_values.iter().map(|s| s * s).sum();
        let top = top.min(us[0].max(0) as usize) as i64;
        let mut out = Vec::with_capacity(k as usize);
        for j in 0..k {
            let col = scores.f_select(1, j)?;
            let (hi, hi_idx) = col.f_topk(top, 0, true, true)?;
            let (lo, lo_idx) = col.f_topk(top, 0, false, true)?;
            let sj = self.singular_values.get(j as usize).copied().unwrap_or(0.0);
            out.push(DirectionSummary {
                energy: if total > 0.0 { sj * sj / total } else { 0.0 },
                top_tokens: Vec::<i64>::try_from(&hi_idx)?,
                top_scores: to_f64_vec(&hi)?,
                bottom_tokens: Vec::<i64>::try_from(&lo_idx)?,
                bottom_scores: to_f64_vec(&lo)?,
            });
        }
        Ok(out)
    }
}

/// One direction of a layer's projected subspace (see [`LayerBasis::directions`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionSummary {
    /// `σ_j² / Σ_i σ_i²`: the direction's share of the difference matrix's energy.
    pub energy: f64,
    /// Token ids with the largest entries of `W_U v_j`, largest first.
    pub top_tokens: Vec<i64>,
    /// Those entries.
    pub top_scores: Vec<f64>,
    /// Token ids with the smallest entries of `W_U v_j` (the other sign), smallest first.
    pub bottom_tokens: Vec<i64>,
    /// Those entries.
    pub bottom_scores: Vec<f64>,
}

/// The per-layer numbers of a ProFS edit (report and manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// The layer.
    pub layer: usize,
    /// Rank asked for.
    pub k: usize,
    /// Rank used.
    pub k_eff: usize,
    /// Numerical rank.
    pub r_eff: usize,
    /// σ₁ … σ_k.
    pub sigma_top_k: Vec<f64>,
    /// Every singular value of the centred difference matrix.
    pub singular_values: Vec<f64>,
    /// σ_k / σ₁.
    pub sigma_k_over_sigma_1: f64,
    /// Energy of the top `k_eff` directions.
    pub explained_energy: f64,
    /// Left unedited (degenerate).
    pub skipped: bool,
    /// Per basis direction: energy share and logit-lens tokens ([`LayerBasis::directions`];
    /// empty in manifests written before they existed).
    #[serde(default)]
    pub directions: Vec<DirectionSummary>,
}

/// Checks `k` against the number of pairs and the hidden size (PF-6) and warns at `k = D`.
///
/// # Errors
/// [`Error::ZeroRank`], [`Error::RankTooLarge`].
pub fn check_rank(k: usize, n_pairs: usize, hidden: usize) -> Result<Option<EditWarning>> {
    if k == 0 {
        return Err(Error::ZeroRank);
    }
    if k > n_pairs || k > hidden {
        return Err(Error::RankTooLarge { k, n_pairs, hidden });
    }
    Ok((k == hidden).then(|| {
        EditWarning::new(
            "PF-6",
            None,
            format!(
                "k = {k} equals the hidden size: P = I and every edited value weight becomes zero (only the bias survives)"
            ),
        )
    }))
}

/// The ProFS basis of one layer from its pooled embeddings.
///
/// ```text
/// T⁰ = (X⁺ − X⁻) / 2                                  [N, D], row i from pair i
/// T  = T⁰ (I − c cᵀ)    c = top right singular vector of X⁺ (TopSingularOfPreferred)
///                           or μ(X⁺)/‖μ(X⁺)‖ (Mean); T = T⁰ for None
/// T  = U Σ Vᵀ,  V_k = first k columns of V,  P = V_k V_kᵀ
/// r_eff = #{σ_j > τ σ₁},  τ = max(N, D)·ε(dtype)
/// ```
///
/// The sign and the ½ of `T⁰` do not change `P`. Computed in `opts.svd_dtype`.
///
/// # Shapes
/// `x_pos`, `x_neg`: `[N, D]` floating; the result's basis is `[D, k_eff]`.
///
/// # Errors
/// [`Error::PairCountMismatch`] (different N), [`Error::ShapeMismatch`],
/// [`Error::InvalidInput`] (no rows, non-finite values), [`Error::ZeroRank`],
/// [`Error::RankTooLarge`], [`Error::RankDeficient`] (policy `Error`),
/// [`Error::DegenerateLayer`], [`Error::Tch`].
///
/// # Example
///
/// The test vector of spec A.11 (`Centering::TopSingularOfPreferred`, k = 1):
///
/// ```
/// use amend_edit::profs::{profs_basis, BasisOptions};
/// use tch::Tensor;
/// let xp = Tensor::from_slice(&[3.0f32, 2., 2., 2., 3., 2., 2., 2., 3., 3., 3., 2.]).view([4, 3]);
/// let xn = Tensor::from_slice(&[1.1f32, 2.4, 1.4, 0.4, 3.1, 1.4, 0.9, 2.4, 2.1, 0.1, 4.1, 1.4])
///     .view([4, 3]);
/// let b = profs_basis(&xp, &xn, 0, &BasisOptions::new(1))?;
/// assert!((b.singular_values[0] - 1.817683).abs() < 1e-4);
/// let p = b.projector()?.unwrap();
/// assert!((p.double_value(&[0, 0]) - 0.504365).abs() < 1e-4);
/// # Ok::<(), amend_edit::Error>(())
/// ```
pub fn profs_basis(
    x_pos: &Tensor,
    x_neg: &Tensor,
    layer: usize,
    opts: &BasisOptions,
) -> Result<LayerBasis> {
    const OP: &str = "profs_basis";
    let (ps, ns) = (x_pos.size(), x_neg.size());
    if ps.len() != 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "x_pos",
            expected: vec![-1, -1],
            got: ps,
        });
    }
    if ns.len() != 2 {
        return Err(Error::ShapeMismatch {
            op: OP,
            name: "x_neg",
            expected: vec![-1, -1],
            got: ns,
        });
    }
    if ps[0] != ns[0] {
        return Err(Error::PairCountMismatch {
            op: OP,
            preferred: ps[0] as usize,
            dispreferred: ns[0] as usize,
        });
    }
    if ps[1] != ns[1] {
        return Err(Error::ShapeMismatch { op: OP, name: "x_neg", expected: ps.clone(), got: ns });
    }
    let (n, d) = (ps[0] as usize, ps[1] as usize);
    if n == 0 || d == 0 {
        return Err(Error::invalid(OP, "x_pos", format!("empty embedding matrix {ps:?}")));
    }
    let mut warnings: Vec<EditWarning> = check_rank(opts.k, n, d)?.into_iter().collect();
    for (name, x) in [("x_pos", x_pos), ("x_neg", x_neg)] {
        if !x.f_is_floating_point()? {
            return Err(Error::invalid(
                OP,
                name,
                format!("{:?} is not a floating dtype", x.kind()),
            ));
        }
        if !bool::try_from(x.f_isfinite()?.f_all()?)? {
            return Err(Error::invalid(
                OP,
                name,
                format!("layer {layer}: embeddings contain NaN or infinite values"),
            ));
        }
    }
    let _guard = tch::no_grad_guard();
    let kind = opts.svd_dtype.kind();
    let eps = opts.svd_dtype.epsilon();
    let xp = x_pos.f_detach()?.f_to_kind(kind)?;
    let xn = x_neg.f_detach()?.f_to_kind(kind)?;
    let t0 = xp.f_sub(&xn)?.f_mul_scalar(0.5)?;

    // Step 6: centering.
    let direction = match opts.centering {
        Centering::TopSingularOfPreferred => {
            let (_, s, v) = xp.f_svd(true, true)?;
            if s.f_double_value(&[0])? > 0.0 { Some(v.f_select(1, 0)?) } else { None }
        }
        Centering::Mean => {
            let mu = xp.f_mean_dim(&[0i64][..], false, kind)?;
            let norm = mu.f_norm()?.f_double_value(&[])?;
            if norm > 0.0 { Some(mu.f_div_scalar(norm)?) } else { None }
        }
        Centering::None => {
            warnings.push(EditWarning::new(
                "PF-5",
                Some(layer),
                "centering is off: the top direction is dominated by the shared mean of the embeddings and the edit is expected to damage the model (ablation only)",
            ));
            None
        }
    };
    if direction.is_none() && opts.centering != Centering::None {
        warnings.push(EditWarning::new(
            "PF-5",
            Some(layer),
            "the preferred embeddings are zero: no centering direction, the difference matrix is used as is",
        ));
    }
    let t = match &direction {
        Some(c) => t0.f_sub(&t0.f_mv(c)?.f_outer(c)?)?,
        None => t0.shallow_clone(),
    };

    // Step 7: SVD and rank checks.
    let (_, s, v) = t.f_svd(true, true)?;
    let sigma = to_f64_vec(&s)?;
    let s1 = sigma.first().copied().unwrap_or(0.0);
    let scale = {
        let (_, s0, _) = t0.f_svd(true, false)?;
        s0.f_double_value(&[0])?
    };
    let tau = (n.max(d) as f64) * eps;
    let k = opts.k;
    if scale == 0.0 || s1 <= tau * scale {
        if !opts.allow_degenerate_layers {
            return Err(Error::DegenerateLayer { layer });
        }
        warnings.push(EditWarning::new(
            "PF-8",
            Some(layer),
            format!("sigma_1 = {s1:e} (numerically zero): layer {layer} is left unedited"),
        ));
        return Ok(LayerBasis {
            layer,
            basis: None,
            singular_values: sigma,
            k,
            k_eff: 0,
            r_eff: 0,
            explained_energy: 0.0,
            skipped: true,
            warnings,
        });
    }
    let r_eff = sigma.iter().filter(|&&x| x > tau * s1).count();
    let mut k_eff = k;
    if k > r_eff {
        let ratio = sigma.get(k - 1).copied().unwrap_or(0.0) / s1;
        match opts.rank_policy {
            RankPolicy::Error => return Err(Error::RankDeficient { layer, k, r_eff, ratio }),
            RankPolicy::WarnKeep => warnings.push(EditWarning::new(
                "PF-7",
                Some(layer),
                format!(
                    "layer {layer}: k = {k} exceeds the numerical rank r_eff = {r_eff} (sigma_k/sigma_1 = {ratio:e}); the trailing {} direction(s) are an arbitrary orthonormal completion",
                    k - r_eff
                ),
            )),
            RankPolicy::Clamp => {
                warnings.push(EditWarning::new(
                    "PF-7",
                    Some(layer),
                    format!(
                        "layer {layer}: k = {k} exceeds the numerical rank r_eff = {r_eff} (sigma_k/sigma_1 = {ratio:e}); clamped to k_eff = {r_eff}"
                    ),
                ));
                k_eff = r_eff;
            }
        }
    }
    // Step 8: the basis V_k (columns of V).
    let basis = v.f_narrow(1, 0, k_eff as i64)?.f_contiguous()?;
    let total: f64 = sigma.iter().map(|x| x * x).sum();
    let top: f64 = sigma.iter().take(k_eff).map(|x| x * x).sum();
    Ok(LayerBasis {
        layer,
        basis: Some(basis),
        singular_values: sigma,
        k,
        k_eff,
        r_eff,
        explained_energy: if total > 0.0 { top / total } else { 0.0 },
        skipped: false,
        warnings,
    })
}

/// [`profs_basis`] for several layers: `x_pos[i]`, `x_neg[i]` are the pooled embeddings of layer
/// `layers[i]`.
///
/// # Errors
/// [`Error::InvalidInput`] when the three slices differ in length; as [`profs_basis`].
pub fn profs_bases(
    x_pos: &[Tensor],
    x_neg: &[Tensor],
    layers: &[usize],
    opts: &BasisOptions,
) -> Result<Vec<LayerBasis>> {
    if x_pos.len() != x_neg.len() || x_pos.len() != layers.len() {
        return Err(Error::invalid(
            "profs_bases",
            "layers",
            format!(
                "{} preferred, {} dis-preferred embedding matrices for {} layers",
                x_pos.len(),
                x_neg.len(),
                layers.len()
            ),
        ));
    }
    x_pos.iter().zip(x_neg).zip(layers).map(|((p, n), &l)| profs_basis(p, n, l, opts)).collect()
}
