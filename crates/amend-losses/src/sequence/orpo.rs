//! ORPO: monolithic preference optimisation with an odds-ratio term added to the NLL of the
//! chosen responses.
//!
//! Paper: Hong, Lee & Thorne, [arXiv 2403.07691](https://arxiv.org/abs/2403.07691). Parity target:
//! TRL `trl/experimental/orpo/orpo_trainer.py` (`odds_ratio_loss`, including its `log1mexp`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    cfg, finish, log1mexp, nll_part, nonempty, pairs, part, preference_metrics, safe_mean, select,
    sum_f64, with_setters,
};
use super::seq_logps::EmptyPolicy;
use crate::{Error, LossOutput, Metrics, Reduction, Result};

/// Which tokens of the chosen sequences the NLL term of ORPO scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NllScope {
    /// Prompt and response tokens (padding masked), as TRL's ORPO trainer does (default). Pass
    /// the log-probs over those tokens as `chosen_nll`.
    #[default]
    PromptAndResponse,
    /// Response tokens only (the `chosen` log-probs themselves).
    ResponseOnly,
}

/// Configuration of [`orpo_loss`]. `beta` is the paper's λ, named as in TRL's `ORPOConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    /// λ > 0, the weight of the odds-ratio term. Default 0.1 (TRL).
    pub beta: f64,
    /// Tokens of the NLL term. Default [`NllScope::PromptAndResponse`] (TRL-compatible).
    pub nll_scope: NllScope,
    /// Pairs with an empty chosen or rejected response (`A` undefined). Default
    /// [`EmptyPolicy::Error`]; the TRL trainer divides unguarded (NaN).
    pub empty_policy: EmptyPolicy,
    /// Shape of [`LossOutput::loss`]. Default [`Reduction::Mean`].
    pub reduction: Reduction,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            nll_scope: NllScope::PromptAndResponse,
            empty_policy: EmptyPolicy::Error,
            reduction: Reduction::Mean,
        }
    }
}

with_setters!(OrpoConfig {
    with_beta => beta: f64,
    with_nll_scope => nll_scope: NllScope,
    with_empty_policy => empty_policy: EmptyPolicy,
    with_reduction => reduction: Reduction,
});

impl OrpoConfig {
    /// Checks every field against its domain.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        cfg::positive("orpo_loss", "beta", self.beta)
    }
}

/// Upper bound on `A` before `log1mexp`: `A = 0` (probability 1) would give `−inf`.
pub const ORPO_MAX_MEAN_LOGP: f64 = -1e-6;

/// ORPO: NLL of the chosen responses plus λ times the odds-ratio loss of each pair.
///
/// ```text
/// A          = S/n over response tokens;  Â = min(A, −1e-6)   (clamp, gradient 0 where clamped)
/// log_odds   = (A_c − A_r) − (log1mexp(Â_c) − log1mexp(Â_r))
/// L_OR       = −λ · log σ(log_odds)                     part "pairs", count = P
/// NLL_chosen = −Σ S_nll / Σ n_nll                        part "tokens", count = scored tokens
/// loss       = mean_pairs L_OR + NLL_chosen
/// log1mexp(x) = log1p(−eˣ) if x < −ln 2 else log(−expm1(x))
/// metrics: rewards/* = λ·A, logps/* = A, nll_loss, log_odds_ratio (mean log σ(log_odds)),
///          log_odds_chosen (mean log_odds), orpo/clamped (clamped A's over 2P)
/// ```
///
/// # Shapes
///
/// * `chosen`, `rejected`: [`SeqLogps`] over `P` pairs, response tokens only
/// * `chosen_nll`: [`SeqLogps`] over the same `P` chosen sequences, prompt and response tokens
///   (required for [`NllScope::PromptAndResponse`], must be `None` for
///   [`NllScope::ResponseOnly`]); score once with the attention mask and use
///   [`SeqLogps::f_restrict`] to get `chosen`
/// * `per_example`: `[P]` (`L_OR`)
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::InvalidInput`] (a missing or superfluous `chosen_nll`),
/// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
/// [`Error::EmptySequence`].
///
/// # Example
///
/// ```
/// use amend_losses::sequence::{orpo_loss, NllScope, OrpoConfig, SeqLogps};
/// use tch::Tensor;
///
/// let chosen = SeqLogps::from_sums(&Tensor::from_slice(&[-10.0f64]), &Tensor::from_slice(&[5i64]))?;
/// let rejected = SeqLogps::from_sums(&Tensor::from_slice(&[-12.0f64]), &Tensor::from_slice(&[6i64]))?;
/// let cfg = OrpoConfig::default().with_nll_scope(NllScope::ResponseOnly);
/// let out = orpo_loss(&chosen, &rejected, None, &cfg)?;
/// // L_OR = 0.1·ln 2 (equal odds) plus the NLL 10/5.
/// assert!((f64::try_from(&out.loss)? - (0.0693147181 + 2.0)).abs() < 1e-9);
/// # Ok::<(), amend_losses::Error>(())
/// ```
pub fn orpo_loss(
    chosen: &SeqLogps,
    rejected: &SeqLogps,
    chosen_nll: Option<&SeqLogps>,
    cfg: &OrpoConfig,
) -> Result<LossOutput> {
    const OP: &str = "orpo_loss";
    cfg.validate()?;
    let pr = pairs(OP, chosen, rejected)?;
    let nll_src = match (cfg.nll_scope, chosen_nll) {
        (NllScope::PromptAndResponse, Some(n)) => n,
        (NllScope::ResponseOnly, None) => chosen,
        (NllScope::PromptAndResponse, None) => {
            return Err(Error::InvalidInput {
                op: OP,
                name: "chosen_nll",
                reason: "nll_scope = prompt_and_response needs the chosen log-probs over prompt \
                         and response tokens"
                    .into(),
            });
        }
        (NllScope::ResponseOnly, Some(_)) => {
            return Err(Error::InvalidInput {
                op: OP,
                name: "chosen_nll",
                reason: "nll_scope = response_only scores `chosen` itself; pass None".into(),
            });
        }
    };
    let all = Tensor::f_ones([pr.p], (Kind::Bool, pr.device))?;
    let valid = nonempty(OP, &pr.n_c, Some(&all), cfg.empty_policy)?;
    let valid = nonempty(OP, &pr.n_r, Some(&valid), cfg.empty_policy)?;
    let a_c = safe_mean(&pr.s_c, &pr.n_c, &valid)?;
    let a_r = safe_mean(&pr.s_r, &pr.n_r, &valid)?;
    // Invalid pairs hold A = 0: move them into log1mexp's domain too (their values are selected
    // away, and the clamp has zero gradient there).
    let clamp = |a: &Tensor| -> Result<(Tensor, Tensor)> {
        let clamped = a.f_gt(ORPO_MAX_MEAN_LOGP)?.f_logical_and(&valid)?;
        let safe = a.f_clamp_max(ORPO_MAX_MEAN_LOGP)?;
        Ok((safe, clamped))
    };
    let (ac_hat, clamped_c) = clamp(&a_c)?;
    let (ar_hat, clamped_r) = clamp(&a_r)?;
    let log_odds = a_c.f_sub(&a_r)?.f_sub(&log1mexp(&ac_hat)?.f_sub(&log1mexp(&ar_hat)?)?)?;
    let log_odds = select(&log_odds, &valid)?;
    let log_sig = log_odds.f_log_sigmoid()?;
    let per_pair = select(&log_sig.f_mul_scalar(-cfg.beta)?, &valid)?;

    let mut metrics = Metrics::new();
    preference_metrics(
        &mut metrics,
        &a_c.f_mul_scalar(cfg.beta)?,
        &a_r.f_mul_scalar(cfg.beta)?,
        &a_c,
        &a_r,
        &valid,
    )?;
    super::common::add_mean(&mut metrics, "log_odds_ratio", &log_sig, &valid)?;
    super::common::add_mean(&mut metrics, "log_odds_chosen", &log_odds, &valid)?;
    let n_clamped = sum_f64(&clamped_c.f_to_kind(Kind::Double)?)?
        + sum_f64(&clamped_r.f_to_kind(Kind::Double)?)?;
    let n_valid = super::common::count_f64(&valid)?;
    metrics.add("orpo/clamped", n_clamped, 2.0 * n_valid);

    let mut parts = vec![part("pairs", &per_pair, &valid, 1.0)?];
    if chosen_nll.is_some() {
        super::common::check_shape(OP, "chosen_nll.sum", &nll_src.sum, &[pr.p], || {
            format!("[P] = [{}] matching chosen", pr.p)
        })?;
    }
    let (nll, (nll_sum, nll_count)) =
        nll_part(OP, "tokens", nll_src, Some(&valid), 1.0, pr.kind, pr.device)?;
    metrics.add("nll_loss", nll_sum, nll_count);
    parts.push(nll);
    finish(per_pair, parts, metrics, cfg.reduction)
}
