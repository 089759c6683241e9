//! Reference-based pairwise preference losses: the DPO family at the level of TRL 1.16's
//! `DPOTrainer` (every `loss_type`, weighted mixtures of them, the f-divergence rewards,
//! length-desensitised log-probs and WPO weights), plus amend's cDPO.
//!
//! Papers: DPO [arXiv 2305.18290](https://arxiv.org/abs/2305.18290), IPO
//! [arXiv 2310.12036](https://arxiv.org/abs/2310.12036), SLiC-HF
//! [arXiv 2305.10425](https://arxiv.org/abs/2305.10425), robust DPO
//! [arXiv 2403.00409](https://arxiv.org/abs/2403.00409), EXO
//! [arXiv 2402.00856](https://arxiv.org/abs/2402.00856), NCA
//! [arXiv 2402.05369](https://arxiv.org/abs/2402.05369), BCO
//! [arXiv 2404.04656](https://arxiv.org/abs/2404.04656), SPPO
//! [arXiv 2405.00675](https://arxiv.org/abs/2405.00675), AOT
//! [arXiv 2406.05882](https://arxiv.org/abs/2406.05882), APO
//! [arXiv 2408.06266](https://arxiv.org/abs/2408.06266), DiscoPOP
//! [arXiv 2406.08414](https://arxiv.org/abs/2406.08414), f-DPO
//! [arXiv 2309.16240](https://arxiv.org/abs/2309.16240), LD-DPO
//! [arXiv 2409.06411](https://arxiv.org/abs/2409.06411), WPO
//! [arXiv 2406.11827](https://arxiv.org/abs/2406.11827). Parity target: TRL 1.16
//! `trl/trainer/dpo_trainer.py` (`DPOTrainer._compute_loss`), checked against that function by
//! `scripts/gen_peer_fixtures.py` and `tests/peer_fixtures.rs`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    cfg, check_device, check_float, check_rank, check_shape, constant_input, finish, first_true,
    nonempty, pairs, part, preference_metrics, select, with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// One pairwise loss applied to the (f-divergence) reward margin `Δ = s_c − s_r`; the names are
/// TRL 1.16's `loss_type` values (plus `cdpo` and `trl_sigmoid`, see [`DpoLossType::Sigmoid`]).
///
/// `ρ = S − R` is a response's log-ratio against the reference, `s = f′(ρ)` its score under
/// [`DpoConfig::f_divergence_type`] (`s = ρ` by default), `ε = label_smoothing`, `n` the response
/// length. Where a formula uses `ρ` rather than `s`, TRL does too and the loss is only defined
/// for the reverse KL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DpoLossType {
    /// DPO, `−log σ(βΔ)`; with `ε > 0` amend (like TRL ≤ 0.28) computes the conservative cDPO
    /// `−(1−ε) log σ(βΔ) − ε log σ(−βΔ)` (default). **TRL 1.x's `sigmoid` ignores
    /// `label_smoothing`**: for TRL's behaviour use [`DpoLossType::TrlSigmoid`] (the two agree at
    /// `ε = 0`).
    #[default]
    Sigmoid,
    /// cDPO by its own name: the same as [`DpoLossType::Sigmoid`] with `ε > 0`.
    Cdpo,
    /// TRL 1.x's `sigmoid`: `−log σ(βΔ)` whatever `label_smoothing` (in `[0, 1)`) is (in a TRL mixture,
    /// `label_smoothing` is shared with `exo_pair`, `robust`, `aot` and `aot_unpaired`).
    TrlSigmoid,
    /// Robust DPO, `[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)`, `ε ∈ [0, 0.5)`.
    Robust,
    /// IPO, `(Δ̄ − 1/(2β))²`; `Δ̄ = s_c/n_c − s_r/n_r` unless `ipo_length_normalize = false`.
    Ipo,
    /// SLiC hinge, `max(0, 1 − βΔ)`.
    Hinge,
    /// EXO (pairwise), `KL(q ‖ p_ε)` with `q = (σ(βΔ), σ(−βΔ))` and `p_ε = (1−ε, ε)`:
    /// `σ(βΔ)(log σ(βΔ) − log(1−ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)`; needs `ε ∈ (0, 1)` (EXO's
    /// authors suggest 1e-3).
    ExoPair,
    /// NCA (pairwise), `−log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)`.
    NcaPair,
    /// BCO (pairwise, without BCO's running reward shift), `−log σ(βρ_c) − log σ(−βρ_r)`.
    BcoPair,
    /// SPPO with hard probabilities, `(ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²`.
    SppoHard,
    /// AOT (paired): `h = sort(S_c − S_r) − sort(R_c − R_r)` over the batch, then the cDPO form
    /// `−(1−ε) log σ(βh) − ε log σ(−βh)`. The per-pair values are in sorted order: they do not
    /// belong to the pair at the same index.
    Aot,
    /// AOT (unpaired): `h = sort(ρ_c) − sort(ρ_r)`, then as [`DpoLossType::Aot`].
    AotUnpaired,
    /// APO-zero, `(1 − σ(βρ_c)) + σ(βρ_r)`: raise chosen, lower rejected.
    ApoZero,
    /// APO-down, `σ(βρ_c) + (1 − σ(β(ρ_c − ρ_r)))`: lower both, rejected more.
    ApoDown,
    /// DiscoPOP, `l = βΔ`, `m = σ(l/τ)`: `−log σ(l)·(1 − m) + e^(−l)·m`, `τ = discopop_tau`.
    Discopop,
    /// SFT on the chosen responses, the token mean `−Σ S_c / Σ n_c` over the pairs of the call
    /// (every pair carries the same value, as in TRL). Uses the raw per-token log-probs when the
    /// chosen [`SeqLogps`] has them (so it ignores [`ld_logps`]' weighting, as TRL does).
    Sft,
    /// Length-normalised sigmoid, `−log σ(β(s_c/n_c − s_r/n_r))`.
    SigmoidNorm,
}

impl DpoLossType {
    /// Every loss type, in TRL's order (then amend's names).
    pub const ALL: [DpoLossType; 17] = [
        DpoLossType::Sigmoid,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ExoPair,
        DpoLossType::NcaPair,
        DpoLossType::Robust,
        DpoLossType::BcoPair,
        DpoLossType::SppoHard,
        DpoLossType::Aot,
        DpoLossType::AotUnpaired,
        DpoLossType::ApoZero,
        DpoLossType::ApoDown,
        DpoLossType::Discopop,
        DpoLossType::Sft,
        DpoLossType::SigmoidNorm,
        DpoLossType::Cdpo,
        DpoLossType::TrlSigmoid,
    ];

    /// The config name (`"sigmoid"`, `"exo_pair"`, ...), also the name of its [`LossPart`](crate::LossPart)
    /// in a mixture.
    pub fn name(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Cdpo => "cdpo",
            DpoLossType::TrlSigmoid => "trl_sigmoid",
            DpoLossType::Robust => "robust",
            DpoLossType::Ipo => "ipo",
            DpoLossType::Hinge => "hinge",
            DpoLossType::ExoPair => "exo_pair",
            DpoLossType::NcaPair => "nca_pair",
            DpoLossType::BcoPair => "bco_pair",
            DpoLossType::SppoHard => "sppo_hard",
            DpoLossType::Aot => "aot",
            DpoLossType::AotUnpaired => "aot_unpaired",
            DpoLossType::ApoZero => "apo_zero",
            DpoLossType::ApoDown => "apo_down",
            DpoLossType::Discopop => "discopop",
            DpoLossType::Sft => "sft",
            DpoLossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// Whether the loss reads `label_smoothing`.
    fn uses_smoothing(self) -> bool {
        matches!(
            self,
            DpoLossType::Sigmoid
                | DpoLossType::Cdpo
                | DpoLossType::Robust
                | DpoLossType::ExoPair
                | DpoLossType::Aot
                | DpoLossType::AotUnpaired
        )
    }

    /// Whether the loss is defined under a non-default f-divergence (TRL's list: the f-DPO
    /// reparameterisation leaves a `β log Z(x)` term that only cancels in `s_c − s_r`).
    fn allows_f_divergence(self) -> bool {
        matches!(
            self,
            DpoLossType::Sigmoid
                | DpoLossType::Cdpo
                | DpoLossType::TrlSigmoid
                | DpoLossType::SigmoidNorm
                | DpoLossType::Hinge
                | DpoLossType::Ipo
                | DpoLossType::ExoPair
                | DpoLossType::Robust
                | DpoLossType::Discopop
                | DpoLossType::Sft
        )
    }

    /// Whether the loss divides by the response lengths under `cfg`.
    fn needs_lengths(self, cfg: &DpoConfig) -> bool {
        match self {
            DpoLossType::Ipo => cfg.ipo_length_normalize,
            DpoLossType::SigmoidNorm => true,
            _ => false,
        }
    }

    fn sorts(self) -> bool {
        matches!(self, DpoLossType::Aot | DpoLossType::AotUnpaired)
    }
}

/// One loss type or a list of them (TRL's `loss_type` is a list since 0.29; a single string is
/// accepted too). In JSON: `"sigmoid"` or `["sigmoid", "sft"]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DpoLossTypes(Vec<DpoLossType>);

impl DpoLossTypes {
    /// The loss types in order.
    pub fn as_slice(&self) -> &[DpoLossType] {
        &self.0
    }

    /// Whether any term is `t`.
    pub fn contains(&self, t: DpoLossType) -> bool {
        self.0.contains(&t)
    }
}

impl Default for DpoLossTypes {
    fn default() -> Self {
        DpoLossTypes(vec![DpoLossType::Sigmoid])
    }
}

impl From<DpoLossType> for DpoLossTypes {
    fn from(t: DpoLossType) -> Self {
        DpoLossTypes(vec![t])
    }
}

impl From<Vec<DpoLossType>> for DpoLossTypes {
    fn from(v: Vec<DpoLossType>) -> Self {
        DpoLossTypes(v)
    }
}

impl<const N: usize> From<[DpoLossType; N]> for DpoLossTypes {
    fn from(v: [DpoLossType; N]) -> Self {
        DpoLossTypes(v.to_vec())
    }
}

impl PartialEq<DpoLossType> for DpoLossTypes {
    fn eq(&self, other: &DpoLossType) -> bool {
        self.0.as_slice() == [*other]
    }
}

impl Serialize for DpoLossTypes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DpoLossTypes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DpoLossTypes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a DPO loss type (\"sigmoid\", \"ipo\", ...) or a list of them")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                use serde::de::IntoDeserializer;
                Ok(DpoLossTypes(vec![DpoLossType::deserialize(v.into_deserializer())?]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(t) = seq.next_element::<DpoLossType>()? {
                    out.push(t);
                }
                Ok(DpoLossTypes(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// The f-divergence whose `f′` turns a log-ratio `ρ` into a reward score `s` (f-DPO, TRL's
/// `f_divergence_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FDivergence {
    /// `s = ρ` (standard DPO, default).
    #[default]
    ReverseKl,
    /// `s = 1 − e^(−ρ)`.
    ForwardKl,
    /// Jensen–Shannon, `s = ln 2 + log σ(ρ)`.
    JsDivergence,
    /// α-divergence with `α = f_alpha_divergence_coef`: `s = (e^(min((α−1)ρ, 80)) − 1)/(α − 1)`;
    /// `s = ρ` when `|α − 1| < 1e-6`. The clamp at 80 is TRL's (it keeps `e^t` finite in f32);
    /// its gradient is 0 where it binds.
    AlphaDivergence,
}

/// Configuration of [`dpo_loss`]. Field names and defaults follow TRL 1.16's `DPOConfig`.
///
/// In JSON (`amend loss dpo --config`), a TRL mixture reads
/// `{"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// Temperature β > 0 (IPO's τ). Default 0.1 (TRL).
    pub beta: f64,
    /// The loss, or several whose weighted sum is the loss. Default `sigmoid`.
    pub loss_type: DpoLossTypes,
    /// One weight per loss type (finite, ≥ 0); `None` weights every term 1 (TRL). Default `None`.
    pub loss_weights: Option<Vec<f64>>,
    /// Label-noise rate ε, shared by the terms that read it: `[0, 1)` for `sigmoid`/`cdpo`
    /// (cDPO), `aot` and `aot_unpaired`, `[0, 0.5)` for `robust` (0.1 is the suggested value
    /// there), `(0, 1)` for `exo_pair`; it must be 0 when no term reads it. Default 0.
    pub label_smoothing: f64,
    /// The reward score `s = f′(ρ)`. Default [`FDivergence::ReverseKl`]. Other values are only
    /// allowed with `sigmoid`, `cdpo`, `trl_sigmoid`, `sigmoid_norm`, `hinge`, `ipo`, `exo_pair`,
    /// `robust`, `discopop` and `sft` (TRL's rule).
    pub f_divergence_type: FDivergence,
    /// α of [`FDivergence::AlphaDivergence`] (finite). Default 0.5 (TRL).
    pub f_alpha_divergence_coef: f64,
    /// DiscoPOP's temperature τ > 0. Default 0.05 (TRL, the paper's value).
    pub discopop_tau: f64,
    /// IPO only: divide each score by its response length (TRL's behaviour, confirmed with
    /// the IPO authors according to TRL). `false` gives `(Δ − 1/(2β))²`. Default `true`.
    pub ipo_length_normalize: bool,
    /// Pairs with an empty response under a length-normalised loss (`ipo`, `sigmoid_norm`).
    /// Default [`EmptyPolicy::Error`] (TRL clamps `n ≥ 1` instead).
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`] (mean over pairs, as TRL).
    pub reduction: Reduction,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: DpoLossTypes::default(),
            loss_weights: None,
            label_smoothing: 0.0,
            f_divergence_type: FDivergence::ReverseKl,
            f_alpha_divergence_coef: 0.5,
            discopop_tau: 0.05,
            ipo_length_normalize: true,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(DpoConfig {
    with_beta => beta: f64,
    with_label_smoothing => label_smoothing: f64,
    with_f_divergence_type => f_divergence_type: FDivergence,
    with_f_alpha_divergence_coef => f_alpha_divergence_coef: f64,
    with_discopop_tau => discopop_tau: f64,
    with_ipo_length_normalize => ipo_length_normalize: bool,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl DpoConfig {
    /// Returns the config with `loss_type` set: one [`DpoLossType`], or an array / `Vec` of them.
    #[must_use]
    pub fn with_loss_type(mut self, value: impl Into<DpoLossTypes>) -> Self {
        self.loss_type = value.into();
        self
    }

    /// Returns the config with a weighted mixture `Σ wₖ · lossₖ` (TRL's `loss_type` +
    /// `loss_weights`).
    #[must_use]
    pub fn with_mixture(mut self, terms: &[(DpoLossType, f64)]) -> Self {
        self.loss_type = DpoLossTypes(terms.iter().map(|t| t.0).collect());
        self.loss_weights = Some(terms.iter().map(|t| t.1).collect());
        self
    }

    /// The `(loss type, weight)` terms.
    pub fn terms(&self) -> Vec<(DpoLossType, f64)> {
        let w = self.loss_weights.clone().unwrap_or_else(|| vec![1.0; self.loss_type.0.len()]);
        self.loss_type.0.iter().copied().zip(w).collect()
    }

    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "dpo_loss";
        let bad =
            |name: &'static str, reason: String| Error::InvalidConfig { op: OP, name, reason };
        cfg::positive(OP, "beta", self.beta)?;
        cfg::positive(OP, "discopop_tau", self.discopop_tau)?;
        cfg::finite(OP, "f_alpha_divergence_coef", self.f_alpha_divergence_coef)?;
        let types = self.loss_type.as_slice();
        if types.is_empty() {
            return Err(bad("loss_type", "is an empty list; give at least one loss type".into()));
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != types.len() {
                return Err(bad(
                    "loss_weights",
                    format!("has {} weights for {} loss types", w.len(), types.len()),
                ));
            }
            for &x in w {
                cfg::nonnegative(OP, "loss_weights", x)?;
            }
        }
        let eps = self.label_smoothing;
        // trl_sigmoid ignores ε like TRL's sigmoid, so it tolerates one.
        let tolerated = |t: &DpoLossType| t.uses_smoothing() || *t == DpoLossType::TrlSigmoid;
        if !types.iter().any(tolerated) && eps != 0.0 {
            return Err(bad(
                "label_smoothing",
                format!(
                    "is only read by sigmoid (cDPO), cdpo, robust, exo_pair, aot and aot_unpaired \
                     (and ignored by trl_sigmoid); must be 0 for {}, got {eps}",
                    names(types)
                ),
            ));
        }
        for &t in types {
            match t {
                DpoLossType::Sigmoid
                | DpoLossType::Cdpo
                | DpoLossType::TrlSigmoid
                | DpoLossType::Aot
                | DpoLossType::AotUnpaired => {
                    cfg::half_open(OP, "label_smoothing", eps, 0.0, 1.0)?;
                }
                DpoLossType::Robust => cfg::half_open(OP, "label_smoothing", eps, 0.0, 0.5)?,
                DpoLossType::ExoPair if !(eps > 0.0 && eps < 1.0) => {
                    return Err(bad(
                        "label_smoothing",
                        format!(
                            "must be in (0, 1) for exo_pair (its target is (1 − ε, ε); the EXO \
                             authors suggest 1e-3), got {eps}"
                        ),
                    ));
                }
                _ => {}
            }
        }
        if self.f_divergence_type != FDivergence::ReverseKl
            && let Some(t) = types.iter().find(|t| !t.allows_f_divergence())
        {
            return Err(bad(
                "f_divergence_type",
                format!(
                    "{:?} is not defined for {} (the f-DPO reparameterisation only cancels in the \
                     chosen − rejected score difference); use reverse_kl with it",
                    self.f_divergence_type,
                    t.name()
                ),
            ));
        }
        Ok(())
    }
}

fn names(types: &[DpoLossType]) -> String {
    types.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

/// `f′(ρ)` of the configured f-divergence.
fn score(rho: &Tensor, cfg: &DpoConfig) -> Result<Tensor> {
    Ok(match cfg.f_divergence_type {
        FDivergence::ReverseKl => rho.shallow_clone(),
        FDivergence::ForwardKl => rho.f_neg()?.f_exp()?.f_neg()?.f_add_scalar(1.0)?,
        FDivergence::JsDivergence => rho.f_log_sigmoid()?.f_add_scalar(std::f64::consts::LN_2)?,
        FDivergence::AlphaDivergence => {
            let a = cfg.f_alpha_divergence_coef;
            if (a - 1.0).abs() < 1e-6 {
                rho.shallow_clone()
            } else {
                let t = rho.f_mul_scalar(a - 1.0)?.f_clamp_max(80.0)?;
                t.f_exp()?.f_sub_scalar(1.0)?.f_div_scalar(a - 1.0)?
            }
        }
    })
}

/// `−(1−ε) log σ(x) − ε log σ(−x)` (exact `−log σ(x)` at ε = 0).
fn smoothed_sigmoid(x: &Tensor, eps: f64) -> Result<Tensor> {
    let pos = x.f_log_sigmoid()?.f_mul_scalar(-(1.0 - eps))?;
    if eps == 0.0 {
        Ok(pos)
    } else {
        Ok(pos.f_sub(&x.f_neg()?.f_log_sigmoid()?.f_mul_scalar(eps)?)?)
    }
}

/// `sort(a) − sort(b)` over the valid pairs, placed at the valid positions in order.
fn sorted_difference(a: &Tensor, b: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let idx = valid.f_nonzero()?.f_squeeze_dim(1)?;
    let (sa, _) = a.f_index_select(0, &idx)?.f_sort(0, false)?;
    let (sb, _) = b.f_index_select(0, &idx)?.f_sort(0, false)?;
    let d = sa.f_sub(&sb)?;
    Ok(a.f_zeros_like()?.f_index_put(&[Some(idx)], &d, false)?)
}

/// DPO and its reference-based pairwise relatives on summed response log-probs.
///
/// ```text
/// ρ_c = S_c − R_c,  ρ_r = S_r − R_r                 log-ratios (R: reference, constant)
/// s   = f′(ρ)  (ρ under the default reverse KL)     Δ = s_c − s_r
/// sigmoid (DPO, ε = 0; cDPO, ε > 0), cdpo:  L = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)
/// trl_sigmoid:                              L = −log σ(βΔ)
/// robust:        L = [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)
/// ipo:           L = (s_c/n_c − s_r/n_r − 1/(2β))²
/// hinge (SLiC):  L = max(0, 1 − βΔ)                 (subgradient 0 at the hinge)
/// exo_pair:      L = σ(βΔ)(log σ(βΔ) − log(1−ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)
/// nca_pair:      L = −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)
/// bco_pair:      L = −log σ(βρ_c) − log σ(−βρ_r)
/// sppo_hard:     L = (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²
/// aot:           h = sort(S_c − S_r) − sort(R_c − R_r),  L = −(1−ε) log σ(βh) − ε log σ(−βh)
/// aot_unpaired:  h = sort(ρ_c) − sort(ρ_r),            L as aot
/// apo_zero:      L = 1 − σ(βρ_c) + σ(βρ_r)
/// apo_down:      L = σ(βρ_c) + 1 − σ(β(ρ_c − ρ_r))
/// discopop:      l = βΔ, m = σ(l/τ),  L = −log σ(l)(1 − m) + e^(−l) m
/// sft:           L = −Σ_pairs S_c / Σ_pairs n_c       (the same value for every pair)
/// sigmoid_norm:  L = −log σ(β(s_c/n_c − s_r/n_r))
/// mixture:       loss = Σ_k w_k · mean over pairs of L_k      (loss_type list + loss_weights)
/// weights:       L_k ← w_p · L_k per pair                    (dpo_loss_weighted, e.g. WPO)
/// metrics: rewards/chosen = βρ_c, rewards/rejected = βρ_r, rewards/margins,
///          rewards/accuracies (strict >), logps/chosen = S_c, logps/rejected = S_r
/// ```
///
/// `−log σ` is evaluated as a stable softplus with the exact gradient at 0 (identical chosen and
/// rejected give `L = ln 2` and `∂L/∂Δ = −β/2`). Each term is one [`LossPart`](crate::LossPart)
/// over the valid pairs (`"pairs"` for a single loss type, the type's [`name`](DpoLossType::name)
/// in a mixture) with its weight, so [`Reduction::Mean`] is `Σ_k w_k · sum_k / count_k`.
///
/// Length-desensitised DPO (TRL's `ld_alpha`) is [`ld_logps`] applied to the policy's and the
/// reference's log-probs before this call; WPO (TRL's `use_weighting`) is [`wpo_weights`] with
/// [`dpo_loss_weighted`].
///
/// # Shapes
///
/// * `chosen`, `rejected`: [`SeqLogps`] over `P` pairs each (`sum [P]`, `len [P]`)
/// * `ref_chosen`, `ref_rejected`: `[P]`, the reference model's summed log-probs (detached here)
/// * `per_example`: `[P]`, `Σ_k w_k L_k` per pair; count = `P` (valid pairs)
///
/// # Errors
///
/// [`Error::InvalidConfig`] (see [`DpoConfig::validate`]), [`Error::ShapeMismatch`],
/// [`Error::DtypeMismatch`], [`Error::DeviceMismatch`], [`Error::NonFinite`] for a non-finite
/// reference sum, [`Error::EmptySequence`] for an empty response under a length-normalised loss.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{dpo_loss, DpoConfig, DpoLossType, SeqLogps};
/// use tch::Tensor;
///
/// let chosen = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f32, -8.0]), &Tensor::from_slice(&[5i64, 4]))?;
/// let rejected = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f32, -7.0]), &Tensor::from_slice(&[6i64, 4]))?;
/// let (ref_c, ref_r) = (Tensor::from_slice(&[-11.0f32, -8.5]), Tensor::from_slice(&[-11.5f32, -7.2]));
/// let out = dpo_loss(&chosen, &rejected, &ref_c, &ref_r, &DpoConfig::default())?;
/// assert!((f64::try_from(&out.loss)? - 0.6496083621).abs() < 1e-6);
/// assert_eq!(out.metrics.mean("rewards/accuracies"), Some(1.0));
///
/// // TRL's mixture of DPO and SFT: loss_type = ["sigmoid", "sft"], loss_weights = [1.0, 0.5].
/// let mix = DpoConfig::default().with_mixture(&[(DpoLossType::Sigmoid, 1.0), (DpoLossType::Sft, 0.5)]);
/// let out = dpo_loss(&chosen, &rejected, &ref_c, &ref_r, &mix)?;
/// let sft = 18.0 / 9.0; // −(−10 − 8) / (5 + 4)
/// assert!((f64::try_from(&out.loss)? - (0.6496083621 + 0.5 * sft)).abs() < 1e-6);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn dpo_loss(
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    cfg: &DpoConfig,
) -> Result<LossOutput> {
    dpo_impl(chosen, rejected, ref_chosen, ref_rejected, None, cfg)
}

/// [`dpo_loss`] with a constant weight per pair multiplying every term's per-pair loss before
/// the reduction (`L_k ← w_p L_k`). With `w_p = w(chosen_p) · w(rejected_p)` from
/// [`wpo_weights`] this is WPO, TRL's `use_weighting = true`.
///
/// # Shapes
///
/// `pair_weights`: `[P]`, float, finite, ≥ 0 (detached here); the rest as [`dpo_loss`].
///
/// # Errors
///
/// As [`dpo_loss`]; [`Error::InvalidConfig`] for `aot` or `aot_unpaired` (they sort the pairs,
/// which would misalign the weights; TRL refuses too); [`Error::InvalidInput`] for a negative
/// weight.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{dpo_loss, dpo_loss_weighted, DpoConfig, SeqLogps};
/// use tch::Tensor;
///
/// let c = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f64, -8.0]), &Tensor::from_slice(&[5i64, 4]))?;
/// let r = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64, -7.0]), &Tensor::from_slice(&[6i64, 4]))?;
/// let (rc, rr) = (Tensor::from_slice(&[-11.0f64, -8.5]), Tensor::from_slice(&[-11.5f64, -7.2]));
/// let cfg = DpoConfig::default();
/// let ones = dpo_loss_weighted(&c, &r, &rc, &rr, &Tensor::from_slice(&[1.0f64, 1.0]), &cfg)?;
/// assert_eq!(f64::try_from(&ones.loss)?, f64::try_from(&dpo_loss(&c, &r, &rc, &rr, &cfg)?.loss)?);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn dpo_loss_weighted(
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    pair_weights: &Tensor,
    cfg: &DpoConfig,
) -> Result<LossOutput> {
    dpo_impl(chosen, rejected, ref_chosen, ref_rejected, Some(pair_weights), cfg)
}

fn dpo_impl(
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    pair_weights: Option<&Tensor>,
    cfg: &DpoConfig,
) -> Result<LossOutput> {
    const OP: &str = "dpo_loss";
    cfg.validate()?;
    let terms = cfg.terms();
    let pr = pairs(OP, chosen, rejected)?;
    let r_c = constant_input(OP, "ref_chosen", ref_chosen, pr.p, pr.kind, pr.device)?;
    let r_r = constant_input(OP, "ref_rejected", ref_rejected, pr.p, pr.kind, pr.device)?;
    let weights = match pair_weights {
        None => None,
        Some(w) => {
            if let Some((t, _)) = terms.iter().find(|t| t.0.sorts()) {
                return Err(Error::InvalidConfig {
                    op: OP,
                    name: "loss_type",
                    reason: format!(
                        "{} sorts the pairs, so per-pair weights would be misaligned; drop the \
                         weights or the loss type",
                        t.name()
                    ),
                });
            }
            let w = constant_input(OP, "pair_weights", w, pr.p, pr.kind, pr.device)?;
            if let Some((index, count)) = first_true(&w.f_lt(0.0)?)? {
                return Err(Error::InvalidInput {
                    op: OP,
                    name: "pair_weights",
                    reason: format!("{count} negative weights (first at {index:?})"),
                });
            }
            Some(w)
        }
    };
    let mut valid = Tensor::f_ones([pr.p], (Kind::Bool, pr.device))?;
    if terms.iter().any(|t| t.0.needs_lengths(cfg)) {
        valid = nonempty(OP, &pr.n_c, Some(&valid), cfg.empty_policy)?;
        valid = nonempty(OP, &pr.n_r, Some(&valid), cfg.empty_policy)?;
    }
    let s_c = select(&pr.s_c, &valid)?;
    let s_r = select(&pr.s_r, &valid)?;
    let r_c = select(&r_c, &valid)?;
    let r_r = select(&r_r, &valid)?;
    let rho_c = s_c.f_sub(&r_c)?;
    let rho_r = s_r.f_sub(&r_r)?;
    let (sc_c, sc_r) = (score(&rho_c, cfg)?, score(&rho_r, cfg)?);
    let delta = sc_c.f_sub(&sc_r)?;
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let bd = delta.f_mul_scalar(beta)?;
    let lens = || -> Result<(Tensor, Tensor)> {
        Ok((pr.n_c.f_clamp_min(1)?.f_to_kind(pr.kind)?, pr.n_r.f_clamp_min(1)?.f_to_kind(pr.kind)?))
    };
    let mut per_example = Tensor::f_zeros([pr.p], (pr.kind, pr.device))?;
    let mut parts = Vec::with_capacity(terms.len());
    for &(t, w) in &terms {
        let per_pair = match t {
            DpoLossType::Sigmoid | DpoLossType::Cdpo => smoothed_sigmoid(&bd, eps)?,
            DpoLossType::TrlSigmoid => smoothed_sigmoid(&bd, 0.0)?,
            DpoLossType::Robust => {
                let pos = bd.f_log_sigmoid()?.f_mul_scalar(-(1.0 - eps))?;
                let neg = bd.f_neg()?.f_log_sigmoid()?.f_mul_scalar(eps)?;
                pos.f_add(&neg)?.f_div_scalar(1.0 - 2.0 * eps)?
            }
            DpoLossType::Ipo => {
                let d = if cfg.ipo_length_normalize {
                    let (n_c, n_r) = lens()?;
                    sc_c.f_div(&n_c)?.f_sub(&sc_r.f_div(&n_r)?)?
                } else {
                    delta.shallow_clone()
                };
                d.f_sub_scalar(1.0 / (2.0 * beta))?.f_square()?
            }
            DpoLossType::Hinge => bd.f_neg()?.f_add_scalar(1.0)?.f_relu()?,
            DpoLossType::ExoPair => {
                let (lqw, lql) = (bd.f_log_sigmoid()?, bd.f_neg()?.f_log_sigmoid()?);
                let a = lqw.f_exp()?.f_mul(&lqw.f_sub_scalar((-eps).ln_1p())?)?;
                let b = lql.f_exp()?.f_mul(&lql.f_sub_scalar(eps.ln())?)?;
                a.f_add(&b)?
            }
            DpoLossType::NcaPair => {
                let (bc, br) = (rho_c.f_mul_scalar(beta)?, rho_r.f_mul_scalar(beta)?);
                let a = bc.f_log_sigmoid()?.f_neg()?;
                let b = bc.f_neg()?.f_log_sigmoid()?.f_mul_scalar(0.5)?;
                let c = br.f_neg()?.f_log_sigmoid()?.f_mul_scalar(0.5)?;
                a.f_sub(&b)?.f_sub(&c)?
            }
            DpoLossType::BcoPair => {
                let (bc, br) = (rho_c.f_mul_scalar(beta)?, rho_r.f_mul_scalar(beta)?);
                bc.f_log_sigmoid()?.f_neg()?.f_sub(&br.f_neg()?.f_log_sigmoid()?)?
            }
            DpoLossType::SppoHard => {
                let half = 0.5 / beta;
                rho_c
                    .f_sub_scalar(half)?
                    .f_square()?
                    .f_add(&rho_r.f_add_scalar(half)?.f_square()?)?
            }
            DpoLossType::Aot => {
                let h = sorted_difference(&s_c.f_sub(&s_r)?, &r_c.f_sub(&r_r)?, &valid)?;
                smoothed_sigmoid(&h.f_mul_scalar(beta)?, eps)?
            }
            DpoLossType::AotUnpaired => {
                let h = sorted_difference(&rho_c, &rho_r, &valid)?;
                smoothed_sigmoid(&h.f_mul_scalar(beta)?, eps)?
            }
            DpoLossType::ApoZero => {
                let zc = rho_c.f_mul_scalar(beta)?.f_sigmoid()?;
                let zr = rho_r.f_mul_scalar(beta)?.f_sigmoid()?;
                zc.f_neg()?.f_add_scalar(1.0)?.f_add(&zr)?
            }
            DpoLossType::ApoDown => {
                let zc = rho_c.f_mul_scalar(beta)?.f_sigmoid()?;
                let zm = rho_c.f_sub(&rho_r)?.f_mul_scalar(beta)?.f_sigmoid()?;
                zc.f_add(&zm.f_neg()?.f_add_scalar(1.0)?)?
            }
            DpoLossType::Discopop => {
                let m = bd.f_div_scalar(cfg.discopop_tau)?.f_sigmoid()?;
                let logistic = bd.f_log_sigmoid()?.f_neg()?;
                let expo = bd.f_neg()?.f_exp()?;
                logistic.f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?.f_add(&expo.f_mul(&m)?)?
            }
            DpoLossType::Sft => {
                let raw = raw_sum(chosen, pr.kind)?;
                let tokens = pr.n_c.f_where_scalarother(&valid, 0)?.f_sum(pr.kind)?;
                let value = select(&raw, &valid)?
                    .f_sum(pr.kind)?
                    .f_neg()?
                    .f_div(&tokens.f_clamp_min(1.0)?)?;
                value.f_expand([pr.p], false)?.f_mul(&valid.f_to_kind(pr.kind)?)?
            }
            DpoLossType::SigmoidNorm => {
                let (n_c, n_r) = lens()?;
                let d = sc_c.f_div(&n_c)?.f_sub(&sc_r.f_div(&n_r)?)?;
                d.f_mul_scalar(beta)?.f_log_sigmoid()?.f_neg()?
            }
        };
        let per_pair = match &weights {
            Some(wp) => per_pair.f_mul(wp)?,
            None => per_pair,
        };
        let per_pair = select(&per_pair, &valid)?;
        let name = if terms.len() == 1 { "pairs" } else { t.name() };
        parts.push(part(name, &per_pair, &valid, w)?);
        per_example = if terms.len() == 1 && w == 1.0 {
            per_pair
        } else {
            per_example.f_add(&per_pair.f_mul_scalar(w)?)?
        };
    }
    let mut metrics = Metrics::new();
    preference_metrics(
        &mut metrics,
        &rho_c.f_mul_scalar(beta)?,
        &rho_r.f_mul_scalar(beta)?,
        &pr.s_c,
        &pr.s_r,
        &valid,
    )?;
    finish(per_example, parts, metrics, cfg.reduction)
}

/// `Σ_t lp_t` from the per-token log-probs when present (unweighted), else the stored sum.
fn raw_sum(lp: &SeqLogps, kind: Kind) -> Result<Tensor> {
    Ok(match &lp.per_token {
        Some(pt) => pt.f_sum_dim_intlist([1i64].as_slice(), false, kind)?,
        None => lp.sum.f_to_kind(kind)?,
    })
}

/// Length-desensitised log-probs (LD-DPO, TRL's `ld_alpha`): each pair's first
/// `ℓ = min(n_c, n_r)` scored tokens count fully, the longer response's tail beyond them
/// with weight α.
///
/// ```text
/// pos_t = Σ_{t' ≤ t} m_t'                       1-based position among the scored tokens
/// S̃     = Σ_t m_t lp_t · (1 if pos_t ≤ ℓ else α)     (= S at α = 1)
/// ```
///
/// Apply it to the policy's and to the reference's log-probs (both computed with
/// [`SeqLogpsConfig::return_per_token`](super::SeqLogpsConfig::return_per_token)), then pass the
/// results to [`dpo_loss`]. The lengths `n` stay the true lengths (IPO and `sigmoid_norm` divide
/// by them, as TRL does) and `per_token` keeps the unweighted log-probs (the `sft` term reads
/// them, as TRL does). The gradient of `S̃` reaches each token's log-prob with weight 1 or α.
///
/// # Errors
///
/// [`Error::InvalidConfig`] unless `α ∈ [0, 1]` (TRL's range); [`Error::InvalidInput`] when a
/// side has no per-token log-probs or mask; [`Error::ShapeMismatch`] when the two sides do not
/// hold the same number of pairs.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{ld_logps, seq_logps, SeqLogpsConfig};
/// use tch::{Device, Kind, Tensor};
///
/// let logits = Tensor::randn([2, 5, 7], (Kind::Double, Device::Cpu));
/// let ids = Tensor::randint(7, [2, 5], (Kind::Int64, Device::Cpu));
/// // chosen (row 0): 4 response tokens; rejected (row 1): 2
/// let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 1, 0, 1, 1, 0, 0]).view([2, 5]);
/// let lp = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig { return_per_token: true, ..Default::default() })?;
/// let (c, r) = lp.f_split_at(1)?;
/// let (ld_c, ld_r) = ld_logps(&c, &r, 0.5)?;
/// let pt = Vec::<f64>::try_from(c.per_token.as_ref().unwrap().view([-1]))?;
/// let expect = pt[0] + pt[1] + 0.5 * (pt[2] + pt[3]);
/// assert!((f64::try_from(&ld_c.sum)? - expect).abs() < 1e-12);
/// // the shorter side is all shared
/// assert!((f64::try_from(&ld_r.sum)? - f64::try_from(&r.sum)?).abs() < 1e-12);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn ld_logps(
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    alpha: f64,
) -> Result<(SeqLogps, SeqLogps)> {
    const OP: &str = "ld_logps";
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::InvalidConfig {
            op: OP,
            name: "ld_alpha",
            reason: format!("must be in [0, 1] (1 is standard DPO, 0 drops the tail), got {alpha}"),
        });
    }
    let p = chosen.batch_size();
    check_shape(OP, "rejected.sum", &rejected.sum, &[p], || {
        format!("[P] = [{p}] matching chosen")
    })?;
    let shared = chosen.len.f_minimum(&rejected.len)?;
    let one = |lp: &SeqLogps, side: &'static str| -> Result<SeqLogps> {
        let (Some(pt), Some(m)) = (&lp.per_token, &lp.mask) else {
            return Err(Error::InvalidInput {
                op: OP,
                name: side,
                reason: "needs per-token log-probs and a mask (SeqLogpsConfig::return_per_token)"
                    .into(),
            });
        };
        check_rank(OP, side, pt, 2, "[P, T−1]")?;
        check_float(OP, side, pt)?;
        check_device(OP, side, m, pt.device())?;
        let pos = m.f_to_kind(Kind::Int64)?.f_cumsum(1, Kind::Int64)?;
        let tail = pos.f_gt_tensor(&shared.f_unsqueeze(1)?)?.f_logical_and(m)?;
        let w = Tensor::f_ones_like(pt)?.f_where_scalarother(&tail.f_logical_not()?, alpha)?;
        let sum = pt.f_mul(&w)?.f_sum_dim_intlist([1i64].as_slice(), false, pt.kind())?;
        Ok(SeqLogps {
            sum,
            len: lp.len.shallow_clone(),
            per_token: Some(pt.shallow_clone()),
            mask: Some(m.shallow_clone()),
            stats: lp.stats,
        })
    };
    Ok((one(chosen, "chosen")?, one(rejected, "rejected")?))
}

/// WPO's per-sequence weights (TRL's `use_weighting`): the exponentiated mean over the response
/// tokens of the log-prob aligned by the policy's own `log Σ_v p_v²`, detached.
///
/// ```text
/// lp_t = log_softmax(z_t)[y_{t+1}],   a_t = lp_t − log Σ_v exp(2 · log_softmax(z_t)_v)
/// w    = exp(Σ_t m_t a_t / max(1, Σ_t m_t))
/// ```
///
/// The weight of a pair is `w(chosen) · w(rejected)`; pass it to [`dpo_loss_weighted`]. Computed
/// without gradient with torch ops over `[B, T−1, V]` (one log-softmax temporary).
///
/// # Shapes
///
/// `logits [B, T, V]` (unshifted, as [`seq_logps`](super::seq_logps)), `input_ids [B, T]`
/// integer, `completion_mask [B, T]` bool or 0/1 → `[B]` in the logits' float kind (f32 for
/// half precision).
///
/// # Errors
///
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::InvalidInput`] for an id outside `[0, V)`, [`Error::NonFinite`] for NaN logits.
///
/// # Example
///
/// ```
/// use amend_losses::sequence::wpo_weights;
/// use tch::{Device, Kind, Tensor};
///
/// // Uniform logits: lp = −log V and log Σ p² = −log V, so every weight is exp(0) = 1.
/// let logits = Tensor::zeros([2, 4, 5], (Kind::Float, Device::Cpu));
/// let ids = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 3, 2, 1]).view([2, 4]);
/// let mask = Tensor::from_slice(&[0i64, 1, 1, 1, 0, 0, 1, 1]).view([2, 4]);
/// let w = Vec::<f32>::try_from(wpo_weights(&logits, &ids, &mask)?)?;
/// assert!(w.iter().all(|x| (x - 1.0).abs() < 1e-6));
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn wpo_weights(
    logits: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "wpo_weights";
    tch::no_grad(|| {
        let cfg = super::SeqLogpsConfig { return_per_token: true, ..Default::default() };
        let z = logits.f_detach()?;
        let lp = super::seq_logps(&z, input_ids, completion_mask, &cfg)?;
        let (Some(pt), Some(m)) = (&lp.per_token, &lp.mask) else {
            return Err(Error::InvalidInput {
                op: OP,
                name: "logits",
                reason: "seq_logps returned no per-token log-probs".into(),
            });
        };
        let kind = pt.kind();
        let t = z.size()[1];
        let lsm = z.f_narrow(1, 0, t - 1)?.f_to_kind(kind)?.f_log_softmax(-1, kind)?;
        let lss = lsm.f_mul_scalar(2.0)?.f_logsumexp([-1i64].as_slice(), false)?;
        let aligned = pt.f_sub(&lss)?.f_where_scalarother(m, 0.0)?;
        let n = lp.len.f_clamp_min(1)?.f_to_kind(kind)?;
        let mean = aligned.f_sum_dim_intlist([1i64].as_slice(), false, kind)?.f_div(&n)?;
        let w = mean.f_exp()?;
        if let Some((index, count)) = first_true(&w.f_isnan()?)? {
            return Err(Error::NonFinite { op: OP, name: "logits", index, count });
        }
        Ok(w)
    })
}
