//! [`CandidateSet`]: K scored candidate responses per query, the input of RRHF and NEAT.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::SeqLogps;
use super::common::{
    bool_mask, check_device, check_float, check_integer, check_rank, check_shape, first_true,
};
use crate::{Error, Result};

/// Where a NEAT candidate response comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Origin {
    /// A dataset response (preference-data chosen or rejected). Code 0.
    #[default]
    Dataset = 0,
    /// A sample of the current policy under the plain prompt. Code 1.
    Policy = 1,
    /// A sample of the current policy under a negative prompt `w⁻ ⊕ x` (scored without `w⁻`).
    /// Code 2.
    NegPrompt = 2,
}

impl Origin {
    /// The `u8` code stored in [`CandidateSet::origin`].
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// K candidate responses for each of G queries, with their summed log-probs, lengths and
/// rewards (and for NEAT their [`Origin`]).
///
/// Pairs are only ever formed inside a group. Ragged groups use `mask` (false = padding slot,
/// ignored entirely).
///
/// # Shapes
///
/// `sum`, `len`, `rewards`, `mask`, `origin`: all `[G, K]`; `sum` float (on the graph), `len`
/// i64, `rewards` float (any scale; only their order matters), `mask` bool, `origin` u8 codes.
#[derive(Debug)]
pub struct CandidateSet {
    /// `S`, summed response log-probs, `[G, K]`.
    pub sum: Tensor,
    /// `n`, scored tokens per candidate, `[G, K]` i64.
    pub len: Tensor,
    /// Rewards `[G, K]`.
    pub rewards: Tensor,
    /// Which slots hold a candidate; `None` = all.
    pub mask: Option<Tensor>,
    /// [`Origin`] codes, `[G, K]` u8; `None` = all [`Origin::Dataset`].
    pub origin: Option<Tensor>,
}

impl CandidateSet {
    /// Candidates from `[G, K]` sums, lengths and rewards.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`].
    pub fn new(sum: &Tensor, len: &Tensor, rewards: &Tensor) -> Result<CandidateSet> {
        const OP: &str = "CandidateSet::new";
        check_rank(OP, "sum", sum, 2, "[G, K]")?;
        check_float(OP, "sum", sum)?;
        let shape = sum.size();
        check_integer(OP, "len", len)?;
        check_shape(OP, "len", len, &shape, || format!("{shape:?} matching `sum`"))?;
        check_float(OP, "rewards", rewards)?;
        check_shape(OP, "rewards", rewards, &shape, || format!("{shape:?} matching `sum`"))?;
        check_device(OP, "len", len, sum.device())?;
        check_device(OP, "rewards", rewards, sum.device())?;
        Ok(CandidateSet {
            sum: sum.shallow_clone(),
            len: len.f_to_kind(Kind::Int64)?,
            rewards: rewards.shallow_clone(),
            mask: None,
            origin: None,
        })
    }

    /// Candidates from log-probs of `G·K` sequences laid out group by group (row-major), and
    /// `[G, K]` rewards.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] unless `B = G·K`; as [`CandidateSet::new`].
    pub fn from_logps(logps: &SeqLogps, rewards: &Tensor) -> Result<CandidateSet> {
        const OP: &str = "CandidateSet::from_logps";
        check_rank(OP, "rewards", rewards, 2, "[G, K]")?;
        let (g, k) = (rewards.size()[0], rewards.size()[1]);
        check_shape(OP, "logps.sum", &logps.sum, &[g * k], || {
            format!("[G·K] = [{}] for rewards [{g}, {k}]", g * k)
        })?;
        check_shape(OP, "logps.len", &logps.len, &[g * k], || format!("[G·K] = [{}]", g * k))?;
        Self::new(&logps.sum.f_reshape([g, k])?, &logps.len.f_reshape([g, k])?, rewards)
    }

    /// Sets the candidate mask (`[G, K]`, bool or 0/1).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`], [`Error::DeviceMismatch`], [`Error::InvalidInput`].
    pub fn with_mask(mut self, mask: &Tensor) -> Result<CandidateSet> {
        const OP: &str = "CandidateSet::with_mask";
        let shape = self.sum.size();
        check_shape(OP, "mask", mask, &shape, || format!("{shape:?} matching `sum`"))?;
        check_device(OP, "mask", mask, self.sum.device())?;
        self.mask = Some(bool_mask(OP, "mask", mask)?);
        Ok(self)
    }

    /// Sets the origins from a `[G, K]` tensor of [`Origin`] codes (any integer kind).
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`], [`Error::DtypeMismatch`], [`Error::DeviceMismatch`],
    /// [`Error::InvalidInput`] for a code other than 0, 1, 2.
    pub fn with_origin(mut self, origin: &Tensor) -> Result<CandidateSet> {
        const OP: &str = "CandidateSet::with_origin";
        let shape = self.sum.size();
        check_integer(OP, "origin", origin)?;
        check_shape(OP, "origin", origin, &shape, || format!("{shape:?} matching `sum`"))?;
        check_device(OP, "origin", origin, self.sum.device())?;
        let o = origin.f_to_kind(Kind::Int64)?;
        if let Some((index, count)) = first_true(&o.f_lt(0)?.f_logical_or(&o.f_gt(2)?)?)? {
            return Err(Error::InvalidInput {
                op: OP,
                name: "origin",
                reason: format!("{count} codes outside {{0, 1, 2}} (first at {index:?})"),
            });
        }
        self.origin = Some(o.f_to_kind(Kind::Uint8)?);
        Ok(self)
    }

    /// Sets the origins from a row-major slice of `G·K` [`Origin`]s.
    ///
    /// # Errors
    ///
    /// [`Error::ShapeMismatch`] for a slice of the wrong length.
    pub fn with_origins(self, origins: &[Origin]) -> Result<CandidateSet> {
        let shape = self.sum.size();
        let codes: Vec<u8> = origins.iter().map(|o| o.code()).collect();
        let t = Tensor::f_from_slice(&codes)?;
        if codes.len() as i64 != shape[0] * shape[1] {
            return Err(Error::ShapeMismatch {
                op: "CandidateSet::with_origins",
                name: "origins",
                expected: format!("{} = G·K entries for {shape:?}", shape[0] * shape[1]),
                got: vec![codes.len() as i64],
            });
        }
        let t = t.f_reshape(shape.as_slice())?.f_to_device(self.sum.device())?;
        self.with_origin(&t)
    }

    /// Number of groups `G`.
    pub fn groups(&self) -> i64 {
        self.sum.size()[0]
    }

    /// Candidate slots per group `K`.
    pub fn candidates(&self) -> i64 {
        self.sum.size()[1]
    }
}
