//! ProFS configuration (spec A.2).

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// How the dominant common direction is removed from the difference matrix before the SVD (PF-5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Centering {
    /// The reference behaviour: project the difference rows off the first right singular vector
    /// of the **uncentred** preferred embeddings, `T = T⁰ (I − v vᵀ)`.
    #[default]
    TopSingularOfPreferred,
    /// Project off the normalised mean `m = μ / ‖μ‖` of the preferred embeddings.
    Mean,
    /// No centering (ablations only; logs a warning: the top direction is then the shared
    /// stop-word direction and the edit damages the model).
    None,
}

/// How a sentence embedding is pooled from the hidden states of its tokens (PF-3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Pooling {
    /// Mean over the real tokens (attention mask 1).
    #[default]
    MeanMasked,
    /// Parity option: mean over all positions including padding, each side padded (on the right,
    /// with the pad/EOS token) to its longest sequence over the whole sample, as the reference
    /// does. Approximate parity only: padding positions run through the model.
    MeanAllPositions,
}

/// How the N pairs are drawn from the preference data (PF-1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Pairing {
    /// One index per pair, used for both sides.
    #[default]
    Paired,
    /// Parity option (reference HEAD): the two sides are sub-sampled independently, which breaks
    /// the pairs (deliberate difference D1).
    IndependentCompat,
}

/// Floating dtype of the centering, SVD and projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SvdDtype {
    /// f32 (the reference).
    #[default]
    F32,
    /// f64.
    F64,
}

impl SvdDtype {
    /// The tch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            SvdDtype::F32 => tch::Kind::Float,
            SvdDtype::F64 => tch::Kind::Double,
        }
    }

    /// Machine epsilon of the dtype.
    pub fn epsilon(self) -> f64 {
        match self {
            SvdDtype::F32 => f64::from(f32::EPSILON),
            SvdDtype::F64 => f64::EPSILON,
        }
    }
}

/// What to do when `k` exceeds the numerical rank of a layer's centred difference matrix (PF-7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RankPolicy {
    /// Warn and keep `k` (the trailing directions are an arbitrary orthonormal completion).
    #[default]
    WarnKeep,
    /// Warn and use `k_eff = r_eff`.
    Clamp,
    /// Fail with [`Error::RankDeficient`](crate::Error::RankDeficient).
    Error,
}

/// ProFS / DeTox configuration (spec A.2). `Default` gives the reference values; `k` and
/// `layers` default to the per-family reference values of [`profs_defaults`](super::profs_defaults),
/// which exist only for the reference checkpoints.
///
/// ```
/// use amend_edit::profs::{Centering, ProfsConfig};
/// let cfg = ProfsConfig::default().with_layers(2..4).with_k(2).with_centering(Centering::Mean);
/// assert_eq!(cfg.n_pairs, 500);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfsConfig {
    /// Rank of the projected subspace (`None`: the family default, A.5).
    pub k: Option<usize>,
    /// Edited layers, half-open (`None`: the family default, A.5).
    pub layers: Option<Range<usize>>,
    /// Centering (PF-5).
    pub centering: Centering,
    /// Pooling (PF-3).
    pub pooling: Pooling,
    /// Pairing (PF-1).
    pub pairing: Pairing,
    /// Pairs drawn from the data (all of them when the data has fewer).
    pub n_pairs: usize,
    /// Sampling seed.
    pub seed: u64,
    /// Explicit pair indices into the data (pins a run exactly; overrides `n_pairs` and `seed`).
    pub indices: Option<Vec<usize>>,
    /// Tokens per text (longer texts are truncated).
    pub max_len: usize,
    /// Texts per forward pass (the last batch may be partial; no row is dropped, PF-2).
    pub batch: usize,
    /// Edit the MLP value (output) weights.
    pub edit_values: bool,
    /// Also edit the MLP key (input) weights ("not recommended" by the reference).
    pub edit_keys: bool,
    /// Also project the value bias: `b ← (I − P) b`.
    pub project_bias: bool,
    /// Dtype of centering, SVD and projection.
    pub svd_dtype: SvdDtype,
    /// Behaviour when `k` exceeds the numerical rank (PF-7).
    pub rank_policy: RankPolicy,
    /// Leave degenerate layers (σ₁ = 0) unedited with a warning instead of failing (PF-8).
    pub allow_degenerate_layers: bool,
    /// Show a progress bar while embedding.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for ProfsConfig {
    fn default() -> Self {
        ProfsConfig {
            k: None,
            layers: None,
            centering: Centering::default(),
            pooling: Pooling::default(),
            pairing: Pairing::default(),
            n_pairs: 500,
            seed: 42,
            indices: None,
            max_len: 128,
            batch: 50,
            edit_values: true,
            edit_keys: false,
            project_bias: false,
            svd_dtype: SvdDtype::default(),
            rank_policy: RankPolicy::default(),
            allow_degenerate_layers: false,
            progress: false,
        }
    }
}

impl ProfsConfig {
    /// Sets the rank.
    pub fn with_k(mut self, k: usize) -> Self {
        self.k = Some(k);
        self
    }

    /// Sets the edited layers (half-open).
    pub fn with_layers(mut self, layers: Range<usize>) -> Self {
        self.layers = Some(layers);
        self
    }

    /// Sets the centering.
    pub fn with_centering(mut self, centering: Centering) -> Self {
        self.centering = centering;
        self
    }

    /// Sets the pooling.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Sets the number of pairs.
    pub fn with_n_pairs(mut self, n_pairs: usize) -> Self {
        self.n_pairs = n_pairs;
        self
    }

    /// The options of the pure basis computation for rank `k`.
    pub fn basis_options(&self, k: usize) -> BasisOptions {
        BasisOptions {
            k,
            centering: self.centering,
            svd_dtype: self.svd_dtype,
            rank_policy: self.rank_policy,
            allow_degenerate_layers: self.allow_degenerate_layers,
        }
    }
}

/// Options of the pure basis computation [`profs_bases`](super::profs_bases) (a subset of
/// [`ProfsConfig`] with the rank resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasisOptions {
    /// Rank.
    pub k: usize,
    /// Centering.
    pub centering: Centering,
    /// Dtype of the computation.
    pub svd_dtype: SvdDtype,
    /// Rank policy.
    pub rank_policy: RankPolicy,
    /// Skip degenerate layers instead of failing.
    pub allow_degenerate_layers: bool,
}

impl BasisOptions {
    /// Rank `k` with the default centering, f32, `WarnKeep`, degenerate layers an error.
    pub fn new(k: usize) -> Self {
        ProfsConfig::default().basis_options(k)
    }

    /// Sets the centering.
    pub fn with_centering(mut self, centering: Centering) -> Self {
        self.centering = centering;
        self
    }

    /// Sets the dtype.
    pub fn with_svd_dtype(mut self, svd_dtype: SvdDtype) -> Self {
        self.svd_dtype = svd_dtype;
        self
    }

    /// Sets the rank policy.
    pub fn with_rank_policy(mut self, rank_policy: RankPolicy) -> Self {
        self.rank_policy = rank_policy;
        self
    }
}
