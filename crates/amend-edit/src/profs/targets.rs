//! Edit targets per model family (spec A.4) and the reference defaults (A.5).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::project::{Side, WeightLayout};
use crate::{Error, Result};

/// The MLP weights ProFS edits in one model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyTargets {
    /// HF `model_type`s of the family.
    pub model_types: &'static [&'static str],
    /// Key of the value (output) weight of layer `{l}`.
    pub value: &'static str,
    /// Key of the key (input) weight of layer `{l}`.
    pub key: &'static str,
    /// Layout of both weights.
    pub layout: WeightLayout,
}

/// The target table (spec A.4). `qwen2` is an amend addition (it stores its MLP like Llama).
/// amend-models loads `gpt2`, `llama`, `mistral` and `qwen2`; the `gptj` and `opt` rows serve
/// checkpoints edited through [`resolve_targets`] directly.
pub const TARGET_TABLE: &[FamilyTargets] = &[
    FamilyTargets {
        model_types: &["gpt2"],
        value: "transformer.h.{l}.mlp.c_proj.weight",
        key: "transformer.h.{l}.mlp.c_fc.weight",
        layout: WeightLayout::Conv1D,
    },
    FamilyTargets {
        model_types: &["gptj"],
        value: "transformer.h.{l}.mlp.fc_out.weight",
        key: "transformer.h.{l}.mlp.fc_in.weight",
        layout: WeightLayout::Linear,
    },
    FamilyTargets {
        model_types: &["mistral", "llama", "qwen2"],
        value: "model.layers.{l}.mlp.down_proj.weight",
        key: "model.layers.{l}.mlp.up_proj.weight",
        layout: WeightLayout::Linear,
    },
    FamilyTargets {
        model_types: &["opt"],
        value: "model.decoder.layers.{l}.fc2.weight",
        key: "model.decoder.layers.{l}.fc1.weight",
        layout: WeightLayout::Linear,
    },
];

/// The table row of `model_type`.
pub fn family_targets(model_type: &str) -> Option<&'static FamilyTargets> {
    TARGET_TABLE.iter().find(|f| f.model_types.contains(&model_type))
}

/// Whether a target is the value or the key weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRole {
    /// The MLP output ("value") weight.
    Value,
    /// The MLP input ("key") weight.
    Key,
}

/// One weight to edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedTarget {
    /// Layer.
    pub layer: usize,
    /// Checkpoint key.
    pub name: String,
    /// Value or key weight.
    pub role: TargetRole,
    /// Layout.
    pub layout: WeightLayout,
    /// Which side is projected.
    pub side: Side,
    /// The bias key, when `project_bias` applies to this target and the bias exists.
    pub bias: Option<String>,
}

/// Sizes the expected shapes are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetDims {
    /// Layers of the model.
    pub num_layers: usize,
    /// Hidden size D.
    pub hidden: usize,
    /// MLP inner size d_ff.
    pub intermediate: usize,
}

/// Checks a layer range against the model (PF-11).
///
/// # Errors
/// [`Error::LayerRange`] for an empty range or `end > num_layers`.
pub fn check_layer_range(op: &'static str, layers: &Range<usize>, num_layers: usize) -> Result<()> {
    let err =
        |reason| Error::LayerRange { op, start: layers.start, end: layers.end, num_layers, reason };
    if layers.start >= layers.end {
        return Err(err("empty range"));
    }
    if layers.end > num_layers {
        return Err(err("the range reaches past the last layer"));
    }
    Ok(())
}

/// Resolves the weights to edit for `model_type` over `layers` (PF-4), checking that each
/// expected key exists (`shape_of(key)` returns its shape, or `None` when absent) with the
/// expected shape. Nothing is edited if any layer fails.
///
/// ```
/// use amend_edit::profs::{resolve_targets, TargetDims};
/// // An OPT-6.7b-shaped key set: fc2 of layers 10..32 is edited.
/// let dims = TargetDims { num_layers: 32, hidden: 4096, intermediate: 16384 };
/// let shape = |k: &str| k.ends_with("fc2.weight").then(|| vec![4096, 16384])
///     .or_else(|| k.ends_with("fc1.weight").then(|| vec![16384, 4096]));
/// let t = resolve_targets("opt", &shape, dims, &(10..32), true, false, false)?;
/// assert_eq!(t.len(), 22);
/// assert_eq!(t[0].name, "model.decoder.layers.10.fc2.weight");
/// # Ok::<(), amend_edit::Error>(())
/// ```
///
/// # Errors
/// [`Error::NoMatchingTarget`] (unknown family, missing key, wrong shape, nothing to edit);
/// [`Error::LayerRange`].
pub fn resolve_targets(
    model_type: &str,
    shape_of: &dyn Fn(&str) -> Option<Vec<i64>>,
    dims: TargetDims,
    layers: &Range<usize>,
    edit_values: bool,
    edit_keys: bool,
    project_bias: bool,
) -> Result<Vec<ResolvedTarget>> {
    const OP: &str = "profs targets";
    check_layer_range(OP, layers, dims.num_layers)?;
    let fam = family_targets(model_type).ok_or_else(|| Error::NoMatchingTarget {
        op: OP,
        model_type: model_type.to_string(),
        layer: None,
        expected: TARGET_TABLE
            .iter()
            .map(|f| format!("{}: {}", f.model_types.join("/"), f.value))
            .collect(),
        reason: "model_type is not in the ProFS target table".into(),
    })?;
    if !edit_values && !edit_keys {
        return Err(Error::NoMatchingTarget {
            op: OP,
            model_type: model_type.to_string(),
            layer: None,
            expected: vec![fam.value.into(), fam.key.into()],
            reason: "edit_values and edit_keys are both off: nothing would be edited".into(),
        });
    }
    let (d, f) = (dims.hidden as i64, dims.intermediate as i64);
    // Expected shapes: Conv1D stores [in, out], Linear [out, in].
    let (value_shape, key_shape) = match fam.layout {
        WeightLayout::Conv1D => (vec![f, d], vec![d, f]),
        _ => (vec![d, f], vec![f, d]),
    };
    let mut out = Vec::new();
    for l in layers.clone() {
        let mut roles = Vec::new();
        if edit_values {
            roles.push((TargetRole::Value, fam.value, &value_shape, Side::Output));
        }
        if edit_keys {
            roles.push((TargetRole::Key, fam.key, &key_shape, Side::Input));
        }
        for (role, template, shape, side) in roles {
            let name = template.replace("{l}", &l.to_string());
            let fail = |reason: String| Error::NoMatchingTarget {
                op: OP,
                model_type: model_type.to_string(),
                layer: Some(l),
                expected: vec![format!("{name} {shape:?}")],
                reason,
            };
            match shape_of(&name) {
                None => return Err(fail(format!("`{name}` is missing"))),
                Some(s) if &s != shape => {
                    return Err(fail(format!("`{name}` has shape {s:?}")));
                }
                Some(_) => {}
            }
            let bias = if project_bias && role == TargetRole::Value {
                let b = name.strip_suffix(".weight").map(|s| format!("{s}.bias"));
                b.filter(|b| shape_of(b).is_some_and(|s| s == [d]))
            } else {
                None
            };
            out.push(ResolvedTarget { layer: l, name, role, layout: fam.layout, side, bias });
        }
    }
    Ok(out)
}

/// A reference default (spec A.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceDefault {
    /// Reference checkpoint(s).
    pub checkpoint: &'static str,
    /// `model_type`.
    pub model_type: &'static str,
    /// Layers, hidden size, MLP size.
    pub dims: (usize, usize, usize),
    /// Edited layers (half-open).
    pub layers: Range<usize>,
    /// Rank.
    pub k: usize,
}

/// The reference defaults of spec A.5.
pub fn reference_defaults() -> Vec<ReferenceDefault> {
    vec![
        ReferenceDefault {
            checkpoint: "gpt2-medium",
            model_type: "gpt2",
            dims: (24, 1024, 4096),
            layers: 10..24,
            k: 2,
        },
        ReferenceDefault {
            checkpoint: "EleutherAI/gpt-j-6B",
            model_type: "gptj",
            dims: (28, 4096, 16384),
            layers: 10..27,
            k: 10,
        },
        ReferenceDefault {
            checkpoint: "mistralai/Mistral-7B-v0.1, HuggingFaceH4/mistral-7b-sft-beta",
            model_type: "mistral",
            dims: (32, 4096, 14336),
            layers: 15..32,
            k: 10,
        },
        ReferenceDefault {
            checkpoint: "facebook/opt-6.7b",
            model_type: "opt",
            dims: (32, 4096, 16384),
            layers: 10..32,
            k: 10,
        },
    ]
}

/// The reference `(layers, k)` for a model with these sizes, if it has the shape of a reference
/// checkpoint (spec A.5); `None` for any other model (GPT-2 small, Llama, Qwen, …).
///
/// ```
/// use amend_edit::profs::profs_defaults;
/// assert_eq!(profs_defaults("gpt2", 24, 1024, 4096), Some((10..24, 2)));
/// assert_eq!(profs_defaults("gpt2", 12, 768, 3072), None); // GPT-2 small: explicit settings
/// ```
pub fn profs_defaults(
    model_type: &str,
    num_layers: usize,
    hidden: usize,
    intermediate: usize,
) -> Option<(Range<usize>, usize)> {
    reference_defaults()
        .into_iter()
        .find(|r| r.model_type == model_type && r.dims == (num_layers, hidden, intermediate))
        .map(|r| (r.layers, r.k))
}
