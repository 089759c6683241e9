//! `amend loss`: run one of amend's losses on tensors from a safetensors file and write the loss,
//! the per-token or per-example losses and the gradient, for parity checks against Python.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde_json::json;
use tch::{Kind, Tensor};

use amend::losses::sequence::{
    CandidateSet, CpConfig, CpGroups, CpoConfig, DpoConfig, GradientAscentConfig, KtoConfig,
    KtoReferencePoint, NeatConfig, NpoConfig, OrpoConfig, RmuConfig, RrhfConfig, SeqLogps,
    SeqLogpsConfig, SimNpoConfig, SimPoConfig, contrastive_perplexity_loss, cpo_loss, dpo_loss,
    dpo_loss_weighted, gradient_ascent_loss, kto_loss, neat_loss, npo_loss, orpo_loss, rmu_loss,
    rrhf_loss, seq_logps, simnpo_loss, simpo_loss,
};
use amend::losses::token::{
    Candidates, CeuConfig, NlConfig, NllConfig, RefKlConfig, SatImpConfig, SeqUlMask,
    SequenceUlConfig, TntConfig, TntVariant, TokenWeights, UlAnnotatedConfig, UndialConfig,
    WelleckUlConfig, WgaConfig, ceu_loss, conditional_nll_loss, nl_loss, nll_loss,
    reference_kl_loss, satimp_loss, sequence_ul_loss, tnt_loss, ul_annotated_loss, undial_loss,
    welleck_ul_loss, wga_loss,
};
use amend::losses::{LossOutput, Metrics};

/// Run one of amend's losses on tensors from a safetensors file, for parity with Python.
///
/// Reads the tensors the loss needs from --inputs by name (see --list), runs the loss with the
/// JSON config (the loss's serde config, TRL field names; missing fields take their defaults),
/// and writes to --out (safetensors, written atomically, never over an input):
///
///   loss                     the reduced loss (shape set by the config's `reduction`)
///   per_example              token losses [B, T] (token losses) or one value per example
///   part.<name>.sum/.count   (sum, count) of each normalisation domain (f64 scalars)
///   metric.<name>.sum/.count each metric as an exact (sum, count) pair (f64 scalars)
///   grad.<input>             gradient of loss.sum() with respect to each differentiable input
///                            (logits for token losses and seq_logps; the policy log-prob sums
///                            for sequence losses)
///   sum, len, per_token      (seq_logps only) S [B], n [B], log-probs [B, T-1]
///
/// Float inputs keep their dtype (f32 or f64; bf16/f16 are computed in f32); integer inputs
/// (labels, ids) may be any integer dtype, masks bool or 0/1. A tensor the loss does not read
/// is an error (it catches misspelt names). A summary (loss, counts, metrics) is printed as
/// JSON. Guide with a worked Python example: docs/loss-cli.md.
///
/// Example: amend loss tnff --config cfg.json --inputs batch.safetensors --out out.safetensors
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct LossArgs {
    /// The loss (see --list), e.g. tnt, tnff, nll, welleck_ul, reference_kl, dpo, simpo, rrhf.
    #[arg(value_name = "NAME", required_unless_present = "list")]
    pub name: Option<String>,
    /// JSON file with the loss's config (default: the loss's defaults).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// safetensors file with the input tensors, named as --list shows.
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    pub inputs: Option<PathBuf>,
    /// safetensors file to write (atomically; it may not be, or sit inside, an input; an existing
    /// file is replaced).
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    pub out: Option<PathBuf>,
    /// List the losses and the tensors each one reads, then exit.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub threads: super::ThreadsArgs,
}

/// An input tensor of a loss.
struct Input {
    name: &'static str,
    required: bool,
    doc: &'static str,
}

const fn req(name: &'static str, doc: &'static str) -> Input {
    Input { name, required: true, doc }
}

const fn opt(name: &'static str, doc: &'static str) -> Input {
    Input { name, required: false, doc }
}

/// A loss the command runs.
struct Spec {
    name: &'static str,
    aliases: &'static [&'static str],
    config: &'static str,
    about: &'static str,
    /// The loss's name in its paper and in the Python libraries users come from.
    known_as: &'static str,
    inputs: &'static [Input],
}

const LOGITS: Input = req("logits", "[B, T, V] float, aligned with the labels");
const REF_LOGITS: Input = req("ref_logits", "[B, T, V] float, the frozen reference (constant)");
const LABELS: Input = req("labels", "[B, T] integer");
const WEIGHTS: Input = req("weights", "[B, T] in {-1, 0, +1} (negative / inactive / positive)");
const MASK: Input = opt("mask", "[B, T] bool or 0/1, active positions (default: all)");

const SPECS: &[Spec] = &[
    Spec {
        name: "tnt",
        aliases: &["tnff", "tnrr", "tnrf", "tnfll", "tnrll"],
        config: "TntConfig",
        about: "Targeted Negative Training (the alias sets `variant`)",
        known_as: "TNT, Zhang et al. arXiv 2406.13660 (reference code google/t5patches)",
        inputs: &[LOGITS, REF_LOGITS, LABELS, WEIGHTS],
    },
    Spec {
        name: "nl",
        aliases: &[],
        config: "NlConfig",
        about: "negative likelihood on annotated tokens",
        known_as: "the TNT paper's negative-likelihood baseline",
        inputs: &[LOGITS, LABELS, WEIGHTS],
    },
    Spec {
        name: "ul_annotated",
        aliases: &["ul"],
        config: "UlAnnotatedConfig",
        about: "unlikelihood on annotated tokens",
        known_as: "the TNT paper's unlikelihood baseline (annotated tokens)",
        inputs: &[LOGITS, LABELS, WEIGHTS],
    },
    Spec {
        name: "welleck_ul",
        aliases: &[],
        config: "WelleckUlConfig",
        about: "Welleck token-level unlikelihood (previous-context or explicit candidates)",
        known_as: "token-level unlikelihood, Welleck et al. arXiv 1908.04319",
        inputs: &[
            LOGITS,
            LABELS,
            MASK,
            opt("candidates", "[B, T, K] integer, -1 = empty slot (default: previous context)"),
        ],
    },
    Spec {
        name: "sequence_ul",
        aliases: &[],
        config: "SequenceUlConfig",
        about: "sequence-level unlikelihood on repeated n-grams of a continuation",
        known_as: "sequence-level unlikelihood, Welleck et al. arXiv 1908.04319",
        inputs: &[
            LOGITS,
            req("continuation", "[B, T] integer, the continuation tokens the logits score"),
            opt("valid", "[B, T] bool or 0/1 (default: all)"),
            opt("mask", "[B, T] bool or 0/1, explicit penalty mask (default: repeated n-grams)"),
        ],
    },
    Spec {
        name: "nll",
        aliases: &[],
        config: "NllConfig",
        about: "token cross-entropy",
        known_as: "cross-entropy: TRL SFTTrainer's loss, Liger LigerCrossEntropyLoss",
        inputs: &[LOGITS, LABELS, MASK],
    },
    Spec {
        name: "conditional_nll",
        aliases: &[],
        config: "NllConfig",
        about: "token cross-entropy with the prompt masked",
        known_as: "TRL SFT with completion_only_loss; the editing papers' FT objective",
        inputs: &[LOGITS, LABELS, req("prompt_mask", "[B, T] bool or 0/1, true on the prompt")],
    },
    Spec {
        name: "reference_kl",
        aliases: &[],
        config: "RefKlConfig",
        about: "forward or reverse KL to a reference model, per token",
        known_as: "per-token KL to a reference: open-unlearning's KL retain term, distillation",
        inputs: &[
            LOGITS,
            REF_LOGITS,
            opt("exclude", "[B, T] integer, token removed from the target (-1 = none)"),
            MASK,
        ],
    },
    Spec {
        name: "seq_logps",
        aliases: &[],
        config: "SeqLogpsConfig",
        about: "per-sequence log-probs of the response tokens (S, n, per-token)",
        known_as: "TRL concatenated_forward / get_batch_logps log-prob sums",
        inputs: &[
            req("logits", "[B, T, V] float, unshifted"),
            req("input_ids", "[B, T] integer"),
            req("completion_mask", "[B, T] bool or 0/1, true on response tokens"),
        ],
    },
    Spec {
        name: "dpo",
        aliases: &[],
        config: "DpoConfig",
        about: "DPO family: TRL's 15 `loss_type`s or a list + `loss_weights`, `f_divergence_type`; \
                `sigmoid` + `label_smoothing` is cDPO, TRL 1.x's sigmoid (which ignores it) is `trl_sigmoid`",
        known_as: "TRL DPOTrainer (loss_type, loss_weights, f_divergence_type, use_weighting via \
                   pair_weights), Liger LigerFusedLinearDPOLoss",
        inputs: &[
            req("chosen_logps", "[B] float, summed policy log-probs of the chosen responses"),
            req("rejected_logps", "[B] float"),
            req("ref_chosen_logps", "[B] float (constant)"),
            req("ref_rejected_logps", "[B] float (constant)"),
            opt(
                "chosen_lens",
                "[B] integer, response lengths (default 1: ipo, sigmoid_norm, sft need them)",
            ),
            opt("rejected_lens", "[B] integer (default 1)"),
            opt(
                "pair_weights",
                "[B] float >= 0, constant per-pair weights (WPO: w_chosen * w_rejected)",
            ),
        ],
    },
    Spec {
        name: "simpo",
        aliases: &[],
        config: "SimPoConfig",
        about: "SimPO (length-normalised, reference-free)",
        known_as: "SimPO, Meng et al. arXiv 2405.14734; TRL CPOTrainer loss_type=simpo; Liger LigerFusedLinearSimPOLoss",
        inputs: &[
            req("chosen_logps", "[B] float"),
            req("rejected_logps", "[B] float"),
            req("chosen_lens", "[B] integer"),
            req("rejected_lens", "[B] integer"),
        ],
    },
    Spec {
        name: "cpo",
        aliases: &[],
        config: "CpoConfig",
        about: "CPO: reference-free pairwise term (sigmoid, hinge, ipo, simpo) + cpo_alpha * NLL on chosen; AlphaPO via `alpha`",
        known_as: "CPO, Xu et al. arXiv 2401.08417; TRL CPOTrainer; Liger LigerFusedLinearCPOLoss",
        inputs: &[
            req("chosen_logps", "[B] float, summed log-probs of the chosen responses"),
            req("rejected_logps", "[B] float"),
            opt(
                "chosen_lens",
                "[B] integer (default 1; the NLL term and ipo/simpo average by them)",
            ),
            opt("rejected_lens", "[B] integer (default 1)"),
        ],
    },
    Spec {
        name: "orpo",
        aliases: &[],
        config: "OrpoConfig",
        about: "ORPO (odds ratio plus NLL)",
        known_as: "ORPO, Hong et al. arXiv 2403.07691; TRL ORPOTrainer; Liger LigerFusedLinearORPOLoss",
        inputs: &[
            req("chosen_logps", "[B] float"),
            req("rejected_logps", "[B] float"),
            req("chosen_lens", "[B] integer"),
            req("rejected_lens", "[B] integer"),
            opt("chosen_nll_logps", "[B] float, prompt + response sums for the NLL term"),
            opt("chosen_nll_lens", "[B] integer"),
        ],
    },
    Spec {
        name: "kto",
        aliases: &[],
        config: "KtoConfig",
        about: "KTO (reference point given or estimated from mismatched pairs)",
        known_as: "KTO, Ethayarajh et al. arXiv 2402.01306; TRL KTOTrainer; Liger LigerFusedLinearKTOLoss",
        inputs: &[
            req("policy_logps", "[B] float"),
            req("ref_logps", "[B] float (constant)"),
            req("desirable", "[B] bool or 0/1"),
            opt("policy_lens", "[B] integer (default 1)"),
            opt("reference_point", "scalar float z >= 0 (or give the two kl_* tensors)"),
            opt("kl_policy_logps", "[B] float, mismatched pairs under the policy"),
            opt("kl_ref_logps", "[B] float, mismatched pairs under the reference"),
        ],
    },
    Spec {
        name: "npo",
        aliases: &[],
        config: "NpoConfig",
        about: "NPO (negative preference optimisation, optional retain term)",
        known_as: "NPO, Zhang et al. arXiv 2404.05868; open-unlearning NPO",
        inputs: &[
            req("forget_logps", "[B] float"),
            req("ref_forget_logps", "[B] float (constant)"),
            opt("forget_lens", "[B] integer (default 1)"),
            opt("retain_logps", "[R] float"),
            opt("retain_lens", "[R] integer (default 1)"),
        ],
    },
    Spec {
        name: "simnpo",
        aliases: &[],
        config: "SimNpoConfig",
        about: "SimNPO (length-normalised, reference-free NPO)",
        known_as: "SimNPO, Fan et al. arXiv 2410.07163; open-unlearning SimNPO",
        inputs: &[
            req("forget_logps", "[B] float"),
            req("forget_lens", "[B] integer"),
            opt("retain_logps", "[R] float"),
            opt("retain_lens", "[R] integer (default 1)"),
        ],
    },
    Spec {
        name: "gradient_ascent",
        aliases: &[],
        config: "GradientAscentConfig",
        about: "gradient ascent on the forget set (optional retain term)",
        known_as: "open-unlearning GradAscent (GradDiff with a retain term)",
        inputs: &[
            req("forget_logps", "[B] float"),
            opt("forget_lens", "[B] integer (default 1)"),
            opt("retain_logps", "[R] float"),
            opt("retain_lens", "[R] integer (default 1)"),
        ],
    },
    Spec {
        name: "ceu",
        aliases: &["ce_u"],
        config: "CeuConfig",
        about: "cross-entropy unlearning: CE to the model's own distribution with the label masked (TNFF's target from the model itself)",
        known_as: "CE-U, Yang et al. arXiv 2503.01224; open-unlearning CEU",
        inputs: &[LOGITS, LABELS, MASK],
    },
    Spec {
        name: "undial",
        aliases: &[],
        config: "UndialConfig",
        about: "self-distillation to the reference with the label's logit lowered by beta",
        known_as: "UNDIAL, Dong et al. arXiv 2402.10052; open-unlearning UNDIAL",
        inputs: &[LOGITS, REF_LOGITS, LABELS, MASK],
    },
    Spec {
        name: "wga",
        aliases: &[],
        config: "WgaConfig",
        about: "gradient ascent on the forget tokens weighted by p^beta",
        known_as: "WGA, Wang et al. arXiv 2502.19301; open-unlearning WGA",
        inputs: &[LOGITS, LABELS, MASK],
    },
    Spec {
        name: "satimp",
        aliases: &[],
        config: "SatImpConfig",
        about: "gradient ascent on the forget tokens weighted by p^beta1 (1 - p)^beta2",
        known_as: "SatImp, Yang et al. arXiv 2505.11953; open-unlearning SatImp",
        inputs: &[LOGITS, LABELS, MASK],
    },
    Spec {
        name: "rmu",
        aliases: &[],
        config: "RmuConfig",
        about: "representation misdirection: one layer's hidden states to a control vector (forget), to the frozen model's (retain)",
        known_as: "RMU, Li et al. arXiv 2403.03218 (WMDP); open-unlearning RMU",
        inputs: &[
            req("forget_hidden", "[B, T, D] float, the policy's hidden states at the chosen layer"),
            req("forget_mask", "[B, T] bool or 0/1, the labelled positions"),
            req("control", "[D] float, the control vector (constant; amend's rmu_control_vector)"),
            opt("retain_hidden", "[B', T', D] float"),
            opt("retain_ref_hidden", "[B', T', D] float, the frozen model's (constant)"),
            opt("retain_mask", "[B', T'] bool or 0/1"),
        ],
    },
    Spec {
        name: "contrastive_perplexity",
        aliases: &["cp"],
        config: "CpConfig",
        about: "contrastive perplexity over anchors' positive and negative paraphrases",
        known_as: "contrastive perplexity, Klein & Nabi arXiv 2401.08491 (form = paper or reference)",
        inputs: &[
            req("phi_pos", "[G, P] float, phi of each anchor's positives (cp_phi)"),
            req("phi_neg", "[G, N] float, phi of its hard negatives (N may be 0)"),
            opt("mask_pos", "[G, P] bool or 0/1, which positives exist (default: all)"),
            opt("mask_neg", "[G, N] bool or 0/1 (default: all)"),
            opt("phi_rnd", "[G, R] float, phi of random negatives"),
            opt("mask_rnd", "[G, R] bool or 0/1 (default: all)"),
        ],
    },
    Spec {
        name: "rrhf",
        aliases: &[],
        config: "RrhfConfig",
        about: "RRHF ranking (hinge on length-normalised log-probs) plus SFT on the best",
        known_as: "RRHF, Yuan et al. arXiv 2304.05302 (reference code GanjinZero/RRHF)",
        inputs: &[CAND_LOGPS, CAND_LENS, CAND_REWARDS, CAND_MASK],
    },
    Spec {
        name: "neat",
        aliases: &[],
        config: "NeatConfig",
        about: "NEAT: RRHF with policy and negative-prompt candidates",
        known_as: "NEAT, Qiao et al. arXiv 2410.12194 (negative-prompt-driven alignment)",
        inputs: &[
            CAND_LOGPS,
            CAND_LENS,
            req(
                "rewards",
                "[G, K] float (read only for ranking; NegPrompt slots may be anything under forced_lowest)",
            ),
            CAND_MASK,
            opt(
                "origin",
                "[G, K] integer: 0 dataset, 1 policy sample, 2 negative-prompt sample (default: all 0)",
            ),
        ],
    },
];

const CAND_LOGPS: Input =
    req("logps", "[G, K] float, summed response log-probs S of each candidate");
const CAND_LENS: Input = req("lens", "[G, K] integer, scored tokens n of each candidate");
const CAND_REWARDS: Input = req("rewards", "[G, K] float, only their order within a group matters");
const CAND_MASK: Input =
    opt("mask", "[G, K] bool or 0/1, which slots hold a candidate (default: all)");

fn find(name: &str) -> Option<&'static Spec> {
    let lower = name.to_ascii_lowercase();
    SPECS.iter().find(|s| s.name == lower || s.aliases.contains(&lower.as_str()))
}

fn list() -> String {
    let mut s = String::from("Losses of `amend loss` and the tensors they read:\n");
    for spec in SPECS {
        let aliases = if spec.aliases.is_empty() {
            String::new()
        } else {
            format!(" (also: {})", spec.aliases.join(", "))
        };
        s += &format!("\n{}{aliases}: {}; config {}\n", spec.name, spec.about, spec.config);
        s += &format!("    known as: {}\n", spec.known_as);
        for i in spec.inputs {
            let tag = if i.required { "required" } else { "optional" };
            s += &format!("    {:<20} {tag:<8}  {}\n", i.name, i.doc);
        }
    }
    s += "\nOutputs: loss, per_example, part.<name>.{sum,count}, metric.<name>.{sum,count}, \
          grad.<input> (gradient of loss.sum()); seq_logps also writes sum, len, per_token.\n";
    s
}

/// The named tensors of the input file.
struct Inputs {
    spec: &'static Spec,
    tensors: BTreeMap<String, Tensor>,
}

impl Inputs {
    fn read(spec: &'static Spec, path: &Path) -> Result<Inputs> {
        let list = amend::models::read_safetensors(path)
            .with_context(|| format!("cannot read safetensors file {}", path.display()))?;
        let tensors: BTreeMap<String, Tensor> = list.into_iter().collect();
        let known: Vec<&str> = spec.inputs.iter().map(|i| i.name).collect();
        if let Some(extra) = tensors.keys().find(|k| !known.contains(&k.as_str())) {
            bail!(
                "{}: loss `{}` does not read a tensor named `{extra}` (it reads: {}; see \
                 `amend loss --list`)",
                path.display(),
                spec.name,
                known.join(", ")
            );
        }
        for i in spec.inputs.iter().filter(|i| i.required) {
            if !tensors.contains_key(i.name) {
                bail!(
                    "{}: loss `{}` needs a tensor named `{}` ({}); the file has: {}",
                    path.display(),
                    spec.name,
                    i.name,
                    i.doc,
                    tensors.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
        Ok(Inputs { spec, tensors })
    }

    fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// A required tensor (presence was checked when reading).
    fn req(&self, name: &str) -> Result<&Tensor> {
        self.get(name).with_context(|| format!("`{}` needs `{name}`", self.spec.name))
    }

    /// A float input as a leaf requiring grad, in its own dtype (f32 for bf16/f16).
    fn leaf(&self, name: &str) -> Result<Tensor> {
        let t = self.req(name)?;
        let kind = match t.kind() {
            Kind::Double => Kind::Double,
            Kind::Float | Kind::BFloat16 | Kind::Half => Kind::Float,
            other => bail!("`{name}` must be a float tensor, got {other:?}"),
        };
        Ok(t.to_kind(kind).detach().copy().set_requires_grad(true))
    }

    /// `SeqLogps` from `<logps>` and `<lens>` (default: ones), with the sums as a leaf.
    fn seq(&self, logps: &str, lens: &str) -> Result<(SeqLogps, Tensor)> {
        let s = self.leaf(logps)?;
        let n = match self.get(lens) {
            Some(l) => l.shallow_clone(),
            None => Tensor::ones(s.size(), (Kind::Int64, s.device())),
        };
        Ok((SeqLogps::from_sums(&s, &n)?, s))
    }

    fn opt_seq(&self, logps: &str, lens: &str) -> Result<Option<(SeqLogps, Tensor)>> {
        match self.get(logps) {
            Some(_) => Ok(Some(self.seq(logps, lens)?)),
            None => Ok(None),
        }
    }
}

fn config<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T> {
    match path {
        None => Ok(T::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid config for this loss", p.display()))
        }
    }
}

/// What a run produced: the loss output, the leaves to differentiate, extra tensors.
struct Run {
    out: LossOutput,
    leaves: Vec<(&'static str, Tensor)>,
    extra: Vec<(String, Tensor)>,
}

fn token(out: LossOutput, logits: Tensor) -> Run {
    Run { out, leaves: vec![("logits", logits)], extra: Vec::new() }
}

fn run_loss(spec: &'static Spec, alias: &str, inp: &Inputs, cfg: Option<&Path>) -> Result<Run> {
    let weights = || -> Result<TokenWeights> { Ok(TokenWeights::new(inp.req("weights")?)?) };
    Ok(match spec.name {
        "tnt" => {
            let mut c: TntConfig = config(cfg)?;
            if alias != "tnt" {
                c.variant = alias.parse::<TntVariant>()?;
            }
            let z = inp.leaf("logits")?;
            let out = tnt_loss(&z, inp.req("ref_logits")?, inp.req("labels")?, &weights()?, &c)?;
            token(out, z)
        }
        "nl" => {
            let z = inp.leaf("logits")?;
            let c: NlConfig = config(cfg)?;
            token(nl_loss(&z, inp.req("labels")?, &weights()?, &c)?, z)
        }
        "ul_annotated" => {
            let z = inp.leaf("logits")?;
            let c: UlAnnotatedConfig = config(cfg)?;
            token(ul_annotated_loss(&z, inp.req("labels")?, &weights()?, &c)?, z)
        }
        "welleck_ul" => {
            let z = inp.leaf("logits")?;
            let c: WelleckUlConfig = config(cfg)?;
            let cands = match inp.get("candidates") {
                Some(t) => Candidates::Explicit(t),
                None => Candidates::PreviousContext,
            };
            token(welleck_ul_loss(&z, inp.req("labels")?, inp.get("mask"), cands, &c)?, z)
        }
        "sequence_ul" => {
            let z = inp.leaf("logits")?;
            let c: SequenceUlConfig = config(cfg)?;
            let mask = match inp.get("mask") {
                Some(m) => SeqUlMask::Explicit(m),
                None => SeqUlMask::RepeatNgram,
            };
            let out = sequence_ul_loss(&z, inp.req("continuation")?, inp.get("valid"), mask, &c)?;
            token(out, z)
        }
        "nll" => {
            let z = inp.leaf("logits")?;
            let c: NllConfig = config(cfg)?;
            token(nll_loss(&z, inp.req("labels")?, inp.get("mask"), &c)?, z)
        }
        "ceu" => {
            let z = inp.leaf("logits")?;
            let c: CeuConfig = config(cfg)?;
            token(ceu_loss(&z, inp.req("labels")?, inp.get("mask"), &c)?, z)
        }
        "undial" => {
            let z = inp.leaf("logits")?;
            let c: UndialConfig = config(cfg)?;
            let out =
                undial_loss(&z, inp.req("ref_logits")?, inp.req("labels")?, inp.get("mask"), &c)?;
            token(out, z)
        }
        "wga" => {
            let z = inp.leaf("logits")?;
            let c: WgaConfig = config(cfg)?;
            token(wga_loss(&z, inp.req("labels")?, inp.get("mask"), &c)?, z)
        }
        "satimp" => {
            let z = inp.leaf("logits")?;
            let c: SatImpConfig = config(cfg)?;
            token(satimp_loss(&z, inp.req("labels")?, inp.get("mask"), &c)?, z)
        }
        "rmu" => {
            let c: RmuConfig = config(cfg)?;
            let hf = inp.leaf("forget_hidden")?;
            let retain = match (
                inp.get("retain_hidden"),
                inp.get("retain_ref_hidden"),
                inp.get("retain_mask"),
            ) {
                (None, None, None) => None,
                (Some(_), Some(r), Some(m)) => Some((inp.leaf("retain_hidden")?, r, m)),
                _ => bail!(
                    "`rmu` needs all of retain_hidden, retain_ref_hidden and retain_mask, or none"
                ),
            };
            let out = rmu_loss(
                &hf,
                inp.req("forget_mask")?,
                inp.req("control")?,
                retain.as_ref().map(|(h, r, m)| (h, *r, *m)),
                &c,
            )?;
            let mut leaves = vec![("forget_hidden", hf)];
            if let Some((h, _, _)) = retain {
                leaves.push(("retain_hidden", h));
            }
            Run { out, leaves, extra: vec![] }
        }
        "conditional_nll" => {
            let z = inp.leaf("logits")?;
            let c: NllConfig = config(cfg)?;
            let out = conditional_nll_loss(&z, inp.req("labels")?, inp.req("prompt_mask")?, &c)?;
            token(out, z)
        }
        "reference_kl" => {
            let z = inp.leaf("logits")?;
            let c: RefKlConfig = config(cfg)?;
            let out = reference_kl_loss(
                &z,
                inp.req("ref_logits")?,
                inp.get("exclude"),
                inp.get("mask"),
                &c,
            )?;
            token(out, z)
        }
        "seq_logps" => {
            let z = inp.leaf("logits")?;
            let c: SeqLogpsConfig = config(cfg)?;
            let c = c.with_return_per_token(true);
            let lp = seq_logps(&z, inp.req("input_ids")?, inp.req("completion_mask")?, &c)?;
            let per_token = lp.per_token.as_ref().context("per-token log-probs requested")?;
            let out = LossOutput {
                loss: lp.sum.shallow_clone(),
                per_example: lp.sum.shallow_clone(),
                parts: Vec::new(),
                metrics: Metrics::new(),
            };
            let extra = vec![
                ("sum".to_string(), lp.sum.detach()),
                ("len".to_string(), lp.len.shallow_clone()),
                ("per_token".to_string(), per_token.detach()),
            ];
            Run { out, leaves: vec![("logits", z)], extra }
        }
        "dpo" => {
            let c: DpoConfig = config(cfg)?;
            let (ch, lc) = inp.seq("chosen_logps", "chosen_lens")?;
            let (rj, lr) = inp.seq("rejected_logps", "rejected_lens")?;
            let (rc, rr) = (inp.req("ref_chosen_logps")?, inp.req("ref_rejected_logps")?);
            let out = match inp.get("pair_weights") {
                Some(w) => dpo_loss_weighted(&ch, &rj, rc, rr, w, &c)?,
                None => dpo_loss(&ch, &rj, rc, rr, &c)?,
            };
            Run { out, leaves: vec![("chosen_logps", lc), ("rejected_logps", lr)], extra: vec![] }
        }
        "cpo" => {
            let c: CpoConfig = config(cfg)?;
            let (ch, lc) = inp.seq("chosen_logps", "chosen_lens")?;
            let (rj, lr) = inp.seq("rejected_logps", "rejected_lens")?;
            let out = cpo_loss(&ch, &rj, &c)?;
            Run { out, leaves: vec![("chosen_logps", lc), ("rejected_logps", lr)], extra: vec![] }
        }
        "simpo" => {
            let c: SimPoConfig = config(cfg)?;
            let (ch, lc) = inp.seq("chosen_logps", "chosen_lens")?;
            let (rj, lr) = inp.seq("rejected_logps", "rejected_lens")?;
            let out = simpo_loss(&ch, &rj, &c)?;
            Run { out, leaves: vec![("chosen_logps", lc), ("rejected_logps", lr)], extra: vec![] }
        }
        "orpo" => {
            let c: OrpoConfig = config(cfg)?;
            let (ch, lc) = inp.seq("chosen_logps", "chosen_lens")?;
            let (rj, lr) = inp.seq("rejected_logps", "rejected_lens")?;
            let nll = inp.opt_seq("chosen_nll_logps", "chosen_nll_lens")?;
            let out = orpo_loss(&ch, &rj, nll.as_ref().map(|(s, _)| s), &c)?;
            let mut leaves = vec![("chosen_logps", lc), ("rejected_logps", lr)];
            if let Some((_, l)) = nll {
                leaves.push(("chosen_nll_logps", l));
            }
            Run { out, leaves, extra: vec![] }
        }
        "kto" => {
            let c: KtoConfig = config(cfg)?;
            let (p, lp) = inp.seq("policy_logps", "policy_lens")?;
            let point = match (
                inp.get("reference_point"),
                inp.get("kl_policy_logps"),
                inp.get("kl_ref_logps"),
            ) {
                (Some(z), None, None) => {
                    if z.numel() != 1 {
                        bail!("`reference_point` must hold one value, got shape {:?}", z.size());
                    }
                    KtoReferencePoint::Given(f64::try_from(
                        z.to_kind(Kind::Double).reshape([-1]).get(0),
                    )?)
                }
                (None, Some(a), Some(b)) => {
                    KtoReferencePoint::Estimate { policy_kl: a, reference_kl: b }
                }
                _ => bail!(
                    "kto needs either `reference_point` or both `kl_policy_logps` and \
                     `kl_ref_logps`"
                ),
            };
            let out = kto_loss(&p, inp.req("ref_logps")?, inp.req("desirable")?, point, &c)?;
            Run { out, leaves: vec![("policy_logps", lp)], extra: vec![] }
        }
        "npo" => {
            let c: NpoConfig = config(cfg)?;
            let (f, lf) = inp.seq("forget_logps", "forget_lens")?;
            let retain = inp.opt_seq("retain_logps", "retain_lens")?;
            let out =
                npo_loss(&f, inp.req("ref_forget_logps")?, retain.as_ref().map(|r| &r.0), &c)?;
            let mut leaves = vec![("forget_logps", lf)];
            if let Some((_, l)) = retain {
                leaves.push(("retain_logps", l));
            }
            Run { out, leaves, extra: vec![] }
        }
        "contrastive_perplexity" => {
            let c: CpConfig = config(cfg)?;
            let pos = inp.leaf("phi_pos")?;
            let neg = inp.leaf("phi_neg")?;
            let rnd = match inp.get("phi_rnd") {
                Some(_) => Some(inp.leaf("phi_rnd")?),
                None => None,
            };
            let groups = CpGroups {
                phi_pos: &pos,
                mask_pos: inp.get("mask_pos"),
                phi_neg: &neg,
                mask_neg: inp.get("mask_neg"),
                phi_rnd: rnd.as_ref(),
                mask_rnd: inp.get("mask_rnd"),
            };
            let out = contrastive_perplexity_loss(&groups, &c)?;
            let mut leaves = vec![("phi_pos", pos), ("phi_neg", neg)];
            if let Some(r) = rnd {
                leaves.push(("phi_rnd", r));
            }
            Run { out, leaves, extra: vec![] }
        }
        "rrhf" | "neat" => {
            let logps = inp.leaf("logps")?;
            let mut cands = CandidateSet::new(&logps, inp.req("lens")?, inp.req("rewards")?)?;
            if let Some(m) = inp.get("mask") {
                cands = cands.with_mask(m)?;
            }
            let out = if spec.name == "rrhf" {
                rrhf_loss(&cands, &config::<RrhfConfig>(cfg)?)?
            } else {
                if let Some(o) = inp.get("origin") {
                    cands = cands.with_origin(o)?;
                }
                neat_loss(&cands, &config::<NeatConfig>(cfg)?)?
            };
            Run { out, leaves: vec![("logps", logps)], extra: vec![] }
        }
        "simnpo" | "gradient_ascent" => {
            let (f, lf) = inp.seq("forget_logps", "forget_lens")?;
            let retain = inp.opt_seq("retain_logps", "retain_lens")?;
            let r = retain.as_ref().map(|r| &r.0);
            let out = if spec.name == "simnpo" {
                simnpo_loss(&f, r, &config::<SimNpoConfig>(cfg)?)?
            } else {
                gradient_ascent_loss(&f, r, &config::<GradientAscentConfig>(cfg)?)?
            };
            let mut leaves = vec![("forget_logps", lf)];
            if let Some((_, l)) = retain {
                leaves.push(("retain_logps", l));
            }
            Run { out, leaves, extra: vec![] }
        }
        other => bail!("internal: no runner for `{other}`"),
    })
}

/// Refuses, before any work, an output path that is, contains or sits inside an input, or is a
/// folder (see `amend::models::output::check_outputs`). An existing file is replaced.
fn check_out(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    use amend::models::output::{Existing, OutputKind, OutputSpec, check_outputs};
    let spec = OutputSpec {
        label: "--out",
        path: out,
        kind: OutputKind::File,
        existing: Existing::ReplaceFile,
    };
    check_outputs(&[spec], inputs)?;
    Ok(())
}

/// Writes `tensors` to `path` through a staging file next to it and a rename, so a reader never
/// sees a half-written file and a failure or an interruption leaves nothing behind.
fn write_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    use amend::models::output::{Replace, Staged};
    let staged = Staged::file("--out", path)?;
    Tensor::write_safetensors(tensors, staged.path())
        .with_context(|| format!("cannot write --out {}", path.display()))?;
    staged.commit(Replace::Any)?;
    Ok(())
}

fn scalar64(x: f64) -> Tensor {
    Tensor::from(x)
}

/// Runs `amend loss`.
pub fn run(args: &LossArgs) -> Result<()> {
    if args.list {
        print!("{}", list());
        return Ok(());
    }
    let name = args.name.as_deref().context("give a loss name (see --list)")?;
    let spec = find(name).with_context(|| {
        let names: Vec<&str> = SPECS
            .iter()
            .flat_map(|s| std::iter::once(s.name).chain(s.aliases.iter().copied()))
            .collect();
        format!("unknown loss `{name}`; known: {}", names.join(", "))
    })?;
    let inputs_path = args.inputs.as_deref().context("--inputs is required")?;
    let out_path = args.out.as_deref().context("--out is required")?;
    let mut protected = vec![("--inputs", inputs_path)];
    if let Some(c) = &args.config {
        protected.push(("--config", c));
    }
    check_out(out_path, &protected)?;
    args.threads.apply();
    let inp = Inputs::read(spec, inputs_path)?;
    let alias = name.to_ascii_lowercase();
    let run = run_loss(spec, &alias, &inp, args.config.as_deref())
        .with_context(|| format!("loss `{}` failed", spec.name))?;
    let out = &run.out;
    // The gradient of loss.sum() (the loss itself for scalar reductions).
    let total = out.loss.sum(out.loss.kind());
    if total.requires_grad() {
        total.backward();
    }
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("loss".into(), out.loss.detach().contiguous()),
        ("per_example".into(), out.per_example.detach().contiguous()),
    ];
    let mut summary_parts = serde_json::Map::new();
    for part in &out.parts {
        let sum = f64::try_from(part.sum.detach().to_kind(Kind::Double))?;
        tensors.push((format!("part.{}.sum", part.name), scalar64(sum)));
        tensors.push((format!("part.{}.count", part.name), scalar64(part.count)));
        summary_parts.insert(part.name.into(), json!({"sum": sum, "count": part.count}));
    }
    let mut summary_metrics = serde_json::Map::new();
    for (name, sc) in out.metrics.iter() {
        tensors.push((format!("metric.{name}.sum"), scalar64(sc.sum)));
        tensors.push((format!("metric.{name}.count"), scalar64(sc.count)));
        summary_metrics.insert(name.into(), json!(sc.mean()));
    }
    for (name, leaf) in &run.leaves {
        let g = leaf.grad();
        let g = if g.defined() { g } else { leaf.zeros_like() };
        tensors.push((format!("grad.{name}"), g.contiguous()));
    }
    for (name, t) in run.extra {
        tensors.push((name, t.contiguous()));
    }
    write_atomic(&tensors, out_path)?;
    let loss: Vec<f64> =
        Vec::<f64>::try_from(out.loss.detach().to_kind(Kind::Double).reshape([-1]))?;
    let summary = json!({
        "loss": if loss.len() == 1 { json!(loss[0]) } else { json!(loss) },
        "parts": summary_parts,
        "metrics": summary_metrics,
        "out": out_path.display().to_string(),
        "tensors": tensors.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
