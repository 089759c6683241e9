//! Pieces shared by the edit reports and the `amend_edit.json` manifest (IO-5): warnings and the
//! deliberate differences from the reference implementations.

use serde::{Deserialize, Serialize};

/// A warning issued during an edit. It is logged (`tracing::warn!`) when created and kept in the
/// report and the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditWarning {
    /// The requirement it relates to (`PF-5`, `PF-6`, `PF-7`, `PF-8`, `FT-5`, …).
    pub code: String,
    /// The layer, when the warning is about one layer.
    pub layer: Option<usize>,
    /// Human-readable text.
    pub message: String,
}

impl EditWarning {
    /// Creates (and logs) a warning.
    pub fn new(code: &str, layer: Option<usize>, message: impl Into<String>) -> Self {
        let message = message.into();
        match layer {
            Some(l) => tracing::warn!(code, layer = l, "{message}"),
            None => tracing::warn!(code, "{message}"),
        }
        EditWarning { code: code.to_string(), layer, message }
    }
}

/// A deliberate difference from a reference implementation (spec A.6 `D1`–`D9`, B.5
/// `DF1`–`DF4`), as listed in the crate docs and the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliberateDifference {
    /// `D1` … `D9`, `DF1` … `DF4`.
    pub id: String,
    /// What the reference does.
    pub reference: String,
    /// What amend does.
    pub amend: String,
    /// The parity option that restores the reference behaviour, if any.
    pub parity_option: Option<String>,
    /// Whether that parity option is in use in this run.
    pub parity_option_in_use: bool,
}

pub(crate) fn diff(
    id: &str,
    reference: &str,
    amend: &str,
    parity_option: Option<&str>,
    in_use: bool,
) -> DeliberateDifference {
    DeliberateDifference {
        id: id.into(),
        reference: reference.into(),
        amend: amend.into(),
        parity_option: parity_option.map(Into::into),
        parity_option_in_use: in_use,
    }
}
