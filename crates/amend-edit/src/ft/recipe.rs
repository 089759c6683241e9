//! Fine-tuning edit recipes (spec B.4) and their presets.

use serde::{Deserialize, Serialize};

use amend_models::CausalLm;
use amend_models::tokenizer::PaddingSide;
use amend_models::train::ScheduleKind;

use super::augment::Augmentation;
use crate::{Error, Result};

/// What is trained on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Objective {
    /// Conditional likelihood of the target given the prompt (FT-M, Gangadhar & Stratos):
    /// prompt tokens carry no loss.
    #[default]
    Conditional,
    /// EasyEdit FT-L: every target token is scored from the **last prompt position**.
    PromptLast,
    /// Full likelihood of prompt ⊕ target (baseline: prompt tokens are trained too).
    Full,
}

/// How token losses are averaged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetReduction {
    /// Σ over all target tokens of the batch / their number (Gangadhar & Stratos).
    #[default]
    TokenMean,
    /// Mean over each example's target tokens, then over examples (EasyEdit FT-M and FT-L).
    ExampleMean,
}

/// How the target mask is built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MaskMode {
    /// By position: exactly the target tokens (FT-1).
    #[default]
    Position,
    /// Parity option (`au-revoir/model-editing-ft`, DF1): every position whose token id occurs
    /// in the target, including matching prompt tokens.
    ValueMaskCompat,
}

/// How edits are applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EditMode {
    /// Each edit alone from the original weights, which are restored from a deep copy after it
    /// (FT-4). The model is unchanged at the end; metrics are per edit.
    Single,
    /// Edits one after another, accumulating (no restore).
    Sequential,
    /// All edits trained together as one data set ("mass editing").
    #[default]
    Batched,
}

/// Which parameters are trained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ParamSelector {
    /// Every parameter (full fine-tuning).
    All,
    /// The MLP output projection (weight and bias) of these layers: GPT-2 `mlp.c_proj`, Llama
    /// `mlp.down_proj`.
    MlpOutput {
        /// Layers.
        layers: Vec<usize>,
    },
    /// EasyEdit's `rewrite_module_tmp`: every parameter whose name contains `template` with `{}`
    /// replaced by a layer (a substring match, so `transformer.h.{}.mlp.c_proj` also catches the
    /// bias).
    Modules {
        /// Template with `{}`.
        template: String,
        /// Layers.
        layers: Vec<usize>,
    },
    /// Every parameter of these blocks.
    Layers {
        /// Layers.
        layers: Vec<usize>,
    },
    /// Exactly these parameter names.
    Names {
        /// Checkpoint keys.
        names: Vec<String>,
    },
}

impl std::fmt::Display for ParamSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamSelector::All => write!(f, "all"),
            ParamSelector::MlpOutput { layers } => write!(f, "mlp_output{layers:?}"),
            ParamSelector::Modules { template, layers } => {
                write!(f, "modules({template}){layers:?}")
            }
            ParamSelector::Layers { layers } => write!(f, "layers{layers:?}"),
            ParamSelector::Names { names } => write!(f, "names{names:?}"),
        }
    }
}

impl ParamSelector {
    /// The parameter names this selector picks in `model`, in checkpoint order.
    ///
    /// # Errors
    /// [`Error::LayerOutOfRange`] for a layer the model does not have; [`Error::NoTrainableParams`] when nothing
    /// matches (an edit would be a silent no-op); [`Error::Model`].
    pub fn resolve<M: CausalLm + ?Sized>(&self, model: &M) -> Result<Vec<String>> {
        const OP: &str = "ParamSelector";
        let n = model.num_layers();
        let check = |layers: &[usize]| -> Result<()> {
            if layers.is_empty() {
                return Err(Error::invalid(OP, "layers", "no layers given"));
            }
            if let Some(&l) = layers.iter().find(|&&l| l >= n) {
                return Err(Error::LayerOutOfRange {
                    op: OP,
                    layer: l,
                    requested: describe_layers(layers),
                    num_layers: n,
                });
            }
            Ok(())
        };
        let params = model.params();
        let names: Vec<String> = match self {
            ParamSelector::All => params.iter().map(|p| p.name().to_string()).collect(),
            ParamSelector::MlpOutput { layers } => {
                check(layers)?;
                let mut wanted = Vec::new();
                for &l in layers {
                    let w = model.mlp_weight(l, amend_models::MlpWeight::Output)?;
                    wanted.push(w.name);
                    if let Some((b, _)) = w.bias {
                        wanted.push(b);
                    }
                }
                params
                    .iter()
                    .map(|p| p.name().to_string())
                    .filter(|name| wanted.contains(name))
                    .collect()
            }
            ParamSelector::Modules { template, layers } => {
                check(layers)?;
                let pats: Vec<String> =
                    layers.iter().map(|l| template.replace("{}", &l.to_string())).collect();
                params
                    .iter()
                    .map(|p| p.name().to_string())
                    .filter(|name| pats.iter().any(|pat| name.contains(pat.as_str())))
                    .collect()
            }
            ParamSelector::Layers { layers } => {
                check(layers)?;
                params
                    .iter()
                    .filter(|p| p.layer().is_some_and(|l| layers.contains(&l)))
                    .map(|p| p.name().to_string())
                    .collect()
            }
            ParamSelector::Names { names } => {
                if let Some(missing) = names.iter().find(|nm| params.get(nm).is_none()) {
                    return Err(amend_models::Error::MissingParam {
                        op: "ParamSelector::Names",
                        name: missing.clone(),
                    }
                    .into());
                }
                params
                    .iter()
                    .map(|p| p.name().to_string())
                    .filter(|name| names.contains(name))
                    .collect()
            }
        };
        if names.is_empty() {
            return Err(Error::NoTrainableParams {
                op: OP,
                selector: self.to_string(),
                model_type: model.config().model_type().to_string(),
            });
        }
        Ok(names)
    }
}

/// The optimizer of an edit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay; with `weight_decay = 0` this is Adam, as EasyEdit uses).
    #[default]
    AdamW,
    /// Plain SGD: `θ ← θ − lr·g` (with decoupled weight decay if set).
    Sgd,
}

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    /// Kind.
    pub kind: OptimizerKind,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (applied to every trained parameter).
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    /// Adam(W) with betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::AdamW,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// A fine-tuning edit recipe (spec B.4). Presets: [`FtRecipe::ft_l`], [`FtRecipe::ft_m`]
/// (EasyEdit), [`FtRecipe::gs_single`], [`FtRecipe::gs_mass`] (Gangadhar & Stratos).
///
/// One *epoch* goes once over the training rows in chunks of `batch_size` rows (one optimizer
/// step per chunk); `epochs` epochs are run unless `early_stop_avg` stops earlier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FtRecipe {
    /// Name (for reports).
    pub name: String,
    /// Objective.
    pub objective: Objective,
    /// Token-loss reduction.
    pub reduction: TargetReduction,
    /// Target mask construction.
    pub mask: MaskMode,
    /// Trained parameters.
    pub params: ParamSelector,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after warm-up.
    pub schedule: ScheduleKind,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Epochs over the training rows.
    pub epochs: usize,
    /// Rows per optimizer step (`None`: all rows, one full-batch step per epoch).
    pub batch_size: Option<usize>,
    /// L∞ box: keep every trained weight within `ε` of its value before the edit.
    pub norm_box: Option<f64>,
    /// Skip the step when the batch loss is below this (EasyEdit: 1e-2).
    pub skip_below: Option<f64>,
    /// Stop when an epoch's mean batch loss is below this (EasyEdit: 1e-2).
    pub early_stop_avg: Option<f64>,
    /// Gradient-norm clip.
    pub max_grad_norm: Option<f64>,
    /// Append EOS (no loss) after the target (Gangadhar & Stratos).
    pub append_eos: bool,
    /// Padding side of training batches (EasyEdit: left).
    pub padding: PaddingSide,
    /// Longest training row in tokens: longer rows lose prompt tokens from the left.
    pub max_length: Option<usize>,
    /// Paraphrase and locality augmentation.
    pub augmentation: Augmentation,
    /// Single, sequential or batched.
    pub mode: EditMode,
    /// Shuffle the rows each epoch.
    pub shuffle: bool,
    /// Seed of shuffles and sampled augmentation.
    pub seed: u64,
}

impl Default for FtRecipe {
    /// [`FtRecipe::ft_m`] on the MLP output of layer 0.
    fn default() -> Self {
        FtRecipe::ft_m(ParamSelector::MlpOutput { layers: vec![0] })
    }
}

impl FtRecipe {
    /// EasyEdit FT-L (`objective_optimization: prompt_last`): Adam lr 5e-4, 25 epochs, one request
    /// per step, skip below 1e-2, early stop below 1e-2, left padding, no norm box (gpt2-xl uses
    /// `norm_box = 5e-4`, mistral-7b 5e-5), single edits.
    pub fn ft_l(params: ParamSelector) -> Self {
        FtRecipe {
            name: "ft-l".into(),
            objective: Objective::PromptLast,
            reduction: TargetReduction::ExampleMean,
            mask: MaskMode::Position,
            params,
            optimizer: OptimizerConfig::default(),
            lr: 5e-4,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            epochs: 25,
            batch_size: Some(1),
            norm_box: None,
            skip_below: Some(1e-2),
            early_stop_avg: Some(1e-2),
            max_grad_norm: None,
            append_eos: false,
            padding: PaddingSide::Left,
            max_length: None,
            augmentation: Augmentation::none(),
            mode: EditMode::Single,
            shuffle: false,
            seed: 0,
        }
    }

    /// EasyEdit FT-M (`objective_optimization: target_new`): as [`FtRecipe::ft_l`] with the
    /// conditional likelihood of the target (position mask, mean per example).
    pub fn ft_m(params: ParamSelector) -> Self {
        FtRecipe { name: "ft-m".into(), objective: Objective::Conditional, ..Self::ft_l(params) }
    }

    /// Gangadhar & Stratos single editing (`single_edit/execute.sh`, GPT-2 XL): all parameters,
    /// AdamW (0.9, 0.999, 1e-8, weight decay 0.01), lr 2.2e-5 constant, 50 full-batch steps,
    /// L_cond with a token mean, EOS after the target, 10 released paraphrase prefixes and up to
    /// 15 locality facts per edit, single edits, no early stop.
    pub fn gs_single() -> Self {
        FtRecipe {
            name: "gs-single".into(),
            objective: Objective::Conditional,
            reduction: TargetReduction::TokenMean,
            mask: MaskMode::Position,
            params: ParamSelector::All,
            optimizer: OptimizerConfig { weight_decay: 0.01, ..OptimizerConfig::default() },
            lr: 2.2e-5,
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            epochs: 50,
            batch_size: None,
            norm_box: None,
            skip_below: None,
            early_stop_avg: None,
            max_grad_norm: None,
            append_eos: true,
            padding: PaddingSide::Right,
            max_length: None,
            augmentation: Augmentation::gs_single(),
            mode: EditMode::Single,
            shuffle: false,
            seed: 42,
        }
    }

    /// Gangadhar & Stratos mass editing (README command, GPT-J 6B): lr 7e-5 cosine without
    /// warm-up, 6 epochs of shuffled batches of 32 rows, effective weight decay 0 (DF4), max
    /// length 256, all 15 released prefixes and locality facts, batched. **Deviation:** the
    /// authors train LoRA (r 32, α 64) on GPT-J; amend v1 trains the selected parameters fully
    /// (`params` = all by default).
    pub fn gs_mass() -> Self {
        FtRecipe {
            name: "gs-mass".into(),
            optimizer: OptimizerConfig::default(),
            lr: 7e-5,
            schedule: ScheduleKind::Cosine,
            epochs: 6,
            batch_size: Some(32),
            max_length: Some(256),
            augmentation: Augmentation::gs_mass(),
            mode: EditMode::Batched,
            shuffle: true,
            ..Self::gs_single()
        }
        .with_weight_decay(0.0)
    }

    /// Sets the mode.
    pub fn with_mode(mut self, mode: EditMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the learning rate.
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Sets the epochs.
    pub fn with_epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }

    /// Sets the augmentation.
    pub fn with_augmentation(mut self, augmentation: Augmentation) -> Self {
        self.augmentation = augmentation;
        self
    }

    /// Sets the trained parameters.
    pub fn with_params(mut self, params: ParamSelector) -> Self {
        self.params = params;
        self
    }

    /// Sets the weight decay.
    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        self.optimizer.weight_decay = wd;
        self
    }

    /// Checks the numbers.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "FtRecipe";
        let pos = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::invalid(OP, name, format!("{v} must be a positive number")))
            }
        };
        pos("lr", self.lr)?;
        if self.epochs == 0 {
            return Err(Error::invalid(OP, "epochs", "must be positive"));
        }
        if self.batch_size == Some(0) {
            return Err(Error::invalid(OP, "batch_size", "must be positive"));
        }
        if let Some(e) = self.norm_box {
            pos("norm_box", e)?;
        }
        if let Some(e) = self.max_grad_norm {
            pos("max_grad_norm", e)?;
        }
        if self.max_length == Some(0) {
            return Err(Error::invalid(OP, "max_length", "must be positive"));
        }
        let o = &self.optimizer;
        for (name, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(OP, name, format!("{v} is not in [0, 1)")));
            }
        }
        pos("optimizer.eps", o.eps)?;
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return Err(Error::invalid(
                OP,
                "optimizer.weight_decay",
                format!("{}", o.weight_decay),
            ));
        }
        if self.objective == Objective::PromptLast && self.mask == MaskMode::ValueMaskCompat {
            return Err(Error::invalid(
                OP,
                "mask",
                "ValueMaskCompat applies to the conditional objective, not prompt_last",
            ));
        }
        self.augmentation.validate()
    }
}

/// `2..9` for a run of consecutive layers, `1, 4, 7` otherwise.
fn describe_layers(layers: &[usize]) -> String {
    let consecutive = layers.windows(2).all(|w| w[1] == w[0] + 1);
    match (layers.first(), layers.last()) {
        (Some(&a), Some(&b)) if consecutive && layers.len() > 1 => format!("{a}..{}", b + 1),
        _ => layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "),
    }
}
