//! Data augmentation of Gangadhar & Stratos (spec B.3): pseudo-paraphrase prefixes (P) and
//! locality facts (R).

use serde::{Deserialize, Serialize};

use amend_models::{CausalLm, GenerationConfig, generate_ids};

use crate::{Error, Result};

/// The 15 paraphrase prefixes released with `au-revoir/model-editing-ft`
/// (`data/generated_prepended_words_paraphrases.json`), in order; each already ends in `". "`.
/// Mass editing uses all 15, single editing the first 10.
pub const RELEASED_PREFIXES: [&str; 15] = [
    "Q: . ",
    "Q: . ",
    "The present invention relates. ",
    "The role of the. ",
    "\n \n-. ",
    "Q: Why is my code not. ",
    "Q: What is the correct way. ",
    "The present invention relates in general to the manufacture. ",
    "The role of the family in the development of. ",
    "\n \n-\n \n1\n. ",
    "A new report from the Center for Immigration Studies. ",
    "Q: How can I use a. ",
    "Q: How to use multiple variables. ",
    "\n \n=\n \n1\n. ",
    "Q: What is the difference in. ",
];

/// Pseudo-paraphrases: text prefixes put before the edit prompt (target `target_new`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Paraphrases {
    /// None.
    None,
    /// The first `count` (≤ 15) of [`RELEASED_PREFIXES`] (exact reproduction for GPT-2/GPT-J).
    Released {
        /// How many.
        count: usize,
    },
    /// Prefixes sampled from the model being edited, starting from its BOS/EOS token, with top-k
    /// sampling: `groups` lists `(number of prefixes, tokens each)` (the authors use
    /// `[(5, 5), (10, 10)]`, top-k 5, seed 42); the first `count` prefixes are used per edit.
    /// Each prefix is the decoded text followed by `". "`.
    Generated {
        /// `(prefixes, tokens)` per group.
        groups: Vec<(usize, usize)>,
        /// Top-k of the sampling.
        top_k: usize,
        /// Sampling seed.
        seed: u64,
        /// Prefixes used per edit.
        count: usize,
    },
}

/// Locality facts: (prompt, true answer) rows trained alongside the edits so that they do not
/// change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LocalityFacts {
    /// None.
    None,
    /// `per_edit` facts drawn at random (seeded, without replacement per edit) from the locality
    /// pool given to the editor (`FtOptions::locality_pool`; the authors' `random_neighborhoods`).
    Random {
        /// Facts per edit.
        per_edit: usize,
    },
    /// `per_edit` facts from the locality pool, those whose answer equals the request's
    /// `target_true` first (sorted stably after a seeded shuffle), then random ones. On
    /// CounterFact-style data these are the subjects that share the edited relation and old
    /// object: the neighbours an edit tends to drag along. amend's stand-in for the authors'
    /// `similar_neighborhood_prompts` (nearest neighbours under an external sentence embedder).
    SameAnswer {
        /// Facts per edit.
        per_edit: usize,
    },
    /// The request's own neighbourhood prompts with `target_true`, up to `per_edit` (closest to
    /// the authors' `similar_neighborhood_prompts`). These are also the prompts the `NS` /
    /// locality metrics evaluate, so those metrics are then no longer held out (a warning is
    /// issued).
    Neighbourhood {
        /// Facts per edit.
        per_edit: usize,
    },
}

/// Augmentation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Augmentation {
    /// Pseudo-paraphrases (P).
    pub paraphrases: Paraphrases,
    /// Locality facts (R).
    pub locality: LocalityFacts,
    /// Locality answers are cut to their first `locality_words` whitespace-separated words (35).
    pub locality_words: usize,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation::none()
    }
}

impl Augmentation {
    /// No augmentation: the edits only (E).
    pub fn none() -> Self {
        Augmentation {
            paraphrases: Paraphrases::None,
            locality: LocalityFacts::None,
            locality_words: 35,
        }
    }

    /// Single-edit preset: the first 10 released prefixes and 15 locality facts with the same old
    /// answer ([`LocalityFacts::SameAnswer`]; the authors use up to 15 *similar* neighbourhood
    /// prompts found with an external sentence embedder).
    pub fn gs_single() -> Self {
        Augmentation {
            paraphrases: Paraphrases::Released { count: 10 },
            locality: LocalityFacts::SameAnswer { per_edit: 15 },
            locality_words: 35,
        }
    }

    /// Mass-edit preset: all 15 released prefixes and 10 random locality facts per edit.
    pub fn gs_mass() -> Self {
        Augmentation {
            paraphrases: Paraphrases::Released { count: 15 },
            locality: LocalityFacts::Random { per_edit: 10 },
            locality_words: 35,
        }
    }

    /// Prefixes generated from the model: `[(5, 5), (10, 10)]` with top-k 5, using `count` per
    /// edit, plus `locality`.
    pub fn generated(count: usize, seed: u64, locality: LocalityFacts) -> Self {
        Augmentation {
            paraphrases: Paraphrases::Generated {
                groups: vec![(5, 5), (10, 10)],
                top_k: 5,
                seed,
                count,
            },
            locality,
            locality_words: 35,
        }
    }

    /// Checks the counts.
    ///
    /// # Errors
    /// [`Error::InvalidInput`].
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "Augmentation";
        match &self.paraphrases {
            Paraphrases::Released { count } if *count > RELEASED_PREFIXES.len() => {
                return Err(Error::invalid(
                    OP,
                    "paraphrases.count",
                    format!("{count} > {} released prefixes", RELEASED_PREFIXES.len()),
                ));
            }
            Paraphrases::Generated { groups, top_k, count, .. } => {
                let total: usize = groups.iter().map(|g| g.0).sum();
                if *count > total {
                    return Err(Error::invalid(
                        OP,
                        "paraphrases.count",
                        format!("{count} > {total} generated prefixes"),
                    ));
                }
                if *top_k == 0 || groups.iter().any(|g| g.1 == 0) {
                    return Err(Error::invalid(
                        OP,
                        "paraphrases",
                        "top_k and lengths must be positive",
                    ));
                }
            }
            _ => {}
        }
        if self.locality_words == 0 {
            return Err(Error::invalid(OP, "locality_words", "must be positive"));
        }
        Ok(())
    }
}

/// The paraphrase prefixes of `p` (each ending in `". "`), generated from `model` when asked.
///
/// # Errors
/// [`Error::Model`] (generation, tokenizer) for `Generated`.
pub fn paraphrase_prefixes<M: CausalLm + ?Sized>(
    model: &M,
    p: &Paraphrases,
) -> Result<Vec<String>> {
    match p {
        Paraphrases::None => Ok(vec![]),
        Paraphrases::Released { count } => {
            Ok(RELEASED_PREFIXES.iter().take(*count).map(|s| s.to_string()).collect())
        }
        Paraphrases::Generated { groups, top_k, seed, count } => {
            let tok = model
                .tokenizer()
                .ok_or(amend_models::Error::NoTokenizer { op: "paraphrase_prefixes" })?;
            let start = tok
                .bos_token_id()
                .or_else(|| tok.eos_token_ids().first().copied())
                .unwrap_or_else(|| tok.pad_token_id());
            let mut out = Vec::new();
            for (g, &(n, len)) in groups.iter().enumerate() {
                let mut cfg = GenerationConfig::sampling(len, 1.0, seed.wrapping_add(g as u64));
                cfg.top_k = Some(*top_k);
                cfg.stop_token_ids = vec![];
                let prompts = vec![vec![start]; n];
                for gen_ in generate_ids(model, &prompts, &cfg)? {
                    let text = tok.decode(&gen_.token_ids, true)?;
                    out.push(format!("{text}. "));
                }
            }
            out.truncate(*count);
            Ok(out)
        }
    }
}

/// The first `words` whitespace-separated words of `text`.
pub(crate) fn first_words(text: &str, words: usize) -> String {
    text.split_whitespace().take(words).collect::<Vec<_>>().join(" ")
}
