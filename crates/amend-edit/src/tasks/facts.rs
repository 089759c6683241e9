//! The synthetic fact-edit task (DESIGN §5): a seeded fact base (subjects × relations →
//! objects) stated with several templates per relation, a tiny GPT-2 trained on it with the
//! [`amend_models::recipe`] module, and counterfactual edit requests with paraphrases,
//! neighbourhood prompts and locality probes.
//!
//! * **Facts.** `n_subjects` invented two-word names; for each of the [`RELATIONS`] every
//!   subject gets one of the relation's 8 objects (seeded).
//! * **Corpus.** Short "biographies": each document states all facts of one subject in a random
//!   order, each with a random template of its relation. Every template of every relation
//!   appears in training, so the base model knows each fact under each phrasing.
//! * **Edit requests.** `n_edits` distinct facts `(s, r, o)`, each rewritten to another object
//!   `o'` of the same relation. The rewrite prompt uses one template; the other templates of the
//!   relation are the paraphrases (**held out** from the edit's training data); the neighbourhood
//!   prompts are other subjects with the same relation and the same true object `o` (CounterFact
//!   style: they must keep answering `o`); locality probes are the edited subject's other facts
//!   (`same_subject`) and the neighbourhood facts (`neighbourhood`).
//! * **Locality pool.** Facts that are neither edited nor probed, for the `R` augmentation.
//!
//! ```
//! use amend_edit::tasks::facts::{FactTask, FactTaskConfig};
//! let task = FactTask::new(&FactTaskConfig::default())?;
//! assert_eq!(task.edits.len(), 20);
//! let e = &task.edits[0];
//! assert_ne!(Some(&e.target_new), e.target_true.as_ref());
//! assert_eq!(e.rephrase.len(), 3);
//! # Ok::<(), amend_edit::Error>(())
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use amend_models::recipe::{
    RunOptions, TinyModelRecipe, TinyModelReport, TinyRecipe, TinyTrainRecipe, TokenizerRecipe,
    load_or_train,
};
use amend_models::{CausalLm, Gpt2};

use crate::metrics::score_answers;
use crate::profs::PreferencePair;
use crate::request::{EditRequest, QaPair};
use crate::{Error, Result};

/// A relation: its templates (`{}` = subject; the object follows after a space) and objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelationSpec {
    /// Name.
    pub name: &'static str,
    /// Templates.
    pub templates: &'static [&'static str],
    /// Possible objects (single lower-case words).
    pub objects: &'static [&'static str],
}

/// The built-in relations.
pub const RELATIONS: &[RelationSpec] = &[
    RelationSpec {
        name: "lives_in",
        templates: &["{} lives in", "the home of {} is in", "{} has a house in", "{} resides in"],
        objects: &["paris", "rome", "berlin", "madrid", "vienna", "lisbon", "dublin", "oslo"],
    },
    RelationSpec {
        name: "works_as",
        templates: &[
            "{} works as a",
            "the job of {} is",
            "by profession {} is a",
            "{} earns a living as a",
        ],
        objects: &["baker", "doctor", "teacher", "farmer", "pilot", "painter", "lawyer", "sailor"],
    },
    RelationSpec {
        name: "plays",
        templates: &[
            "{} plays the",
            "the instrument of {} is the",
            "{} practises the",
            "every evening {} plays the",
        ],
        objects: &["piano", "violin", "guitar", "drums", "flute", "cello", "trumpet", "harp"],
    },
    RelationSpec {
        name: "speaks",
        templates: &["{} speaks", "the language of {} is", "{} is fluent in", "at home {} speaks"],
        objects: &["french", "italian", "german", "spanish", "dutch", "greek", "polish", "swedish"],
    },
    RelationSpec {
        name: "likes_colour",
        templates: &[
            "{} likes the colour",
            "the favourite colour of {} is",
            "{} always wears",
            "{} paints everything",
        ],
        objects: &["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    },
];

const ONSETS: &[&str] =
    &["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "tr", "st"];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ei", "ou"];
const CODAS: &[&str] = &["", "n", "r", "s", "l", "m", "k", "t"];

/// Settings of the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FactTaskConfig {
    /// Seed of names, facts, corpus and edits.
    pub seed: u64,
    /// Subjects.
    pub n_subjects: usize,
    /// Relations used (≤ `RELATIONS.len()`).
    pub n_relations: usize,
    /// Edit requests.
    pub n_edits: usize,
    /// Neighbourhood prompts per edit (fewer when fewer subjects share the fact's object).
    pub neighbours: usize,
    /// Biography documents per subject in the corpus.
    pub docs_per_subject: usize,
}

impl Default for FactTaskConfig {
    fn default() -> Self {
        FactTaskConfig {
            seed: 0,
            n_subjects: 80,
            n_relations: 5,
            n_edits: 20,
            neighbours: 4,
            docs_per_subject: 40,
        }
    }
}

/// The generated task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactTask {
    /// The settings.
    pub config: FactTaskConfig,
    /// Subject names.
    pub subjects: Vec<String>,
    /// `objects[s][r]`: index of subject `s`'s object for relation `r`.
    pub objects: Vec<Vec<usize>>,
    /// The edit requests.
    pub edits: Vec<EditRequest>,
    /// The edited facts: `(subject, relation, new object)`.
    pub edited: Vec<(usize, usize, usize)>,
    /// Facts neither edited nor probed, as (prompt, answer): the pool of `R` augmentation.
    pub locality_pool: Vec<QaPair>,
}

fn name(rng: &mut Xoshiro256PlusPlus, syllables: usize) -> String {
    let mut s = String::new();
    for _ in 0..syllables {
        s.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
        s.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
    }
    s.push_str(CODAS[rng.random_range(0..CODAS.len())]);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => s,
    }
}

impl FactTask {
    /// Generates the task.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for settings that cannot produce the requested edits.
    pub fn new(cfg: &FactTaskConfig) -> Result<Self> {
        const OP: &str = "FactTask::new";
        if cfg.n_relations == 0 || cfg.n_relations > RELATIONS.len() {
            return Err(Error::invalid(
                OP,
                "n_relations",
                format!("must be in 1..={}", RELATIONS.len()),
            ));
        }
        if cfg.n_subjects < 2 || cfg.docs_per_subject == 0 {
            return Err(Error::invalid(
                OP,
                "n_subjects",
                "need at least 2 subjects and 1 document each",
            ));
        }
        if cfg.n_edits > cfg.n_subjects {
            return Err(Error::invalid(OP, "n_edits", "at most one edit per subject"));
        }
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed);
        let mut seen = HashSet::new();
        let mut subjects = Vec::with_capacity(cfg.n_subjects);
        while subjects.len() < cfg.n_subjects {
            let n = format!("{} {}", name(&mut rng, 1), name(&mut rng, 2));
            if seen.insert(n.clone()) {
                subjects.push(n);
            }
        }
        let objects: Vec<Vec<usize>> = (0..cfg.n_subjects)
            .map(|_| {
                (0..cfg.n_relations)
                    .map(|r| rng.random_range(0..RELATIONS[r].objects.len()))
                    .collect()
            })
            .collect();
        let mut task = FactTask {
            config: cfg.clone(),
            subjects,
            objects,
            edits: vec![],
            edited: vec![],
            locality_pool: vec![],
        };
        task.make_edits(&mut rng);
        Ok(task)
    }

    /// The relations in use.
    pub fn relations(&self) -> &'static [RelationSpec] {
        &RELATIONS[..self.config.n_relations]
    }

    /// The prompt of subject `s`, relation `r`, template `t`.
    pub fn prompt(&self, s: usize, r: usize, t: usize) -> String {
        RELATIONS[r].templates[t].replace("{}", &self.subjects[s])
    }

    /// The true object of `(s, r)`.
    pub fn object(&self, s: usize, r: usize) -> &'static str {
        RELATIONS[r].objects[self.objects[s][r]]
    }

    fn make_edits(&mut self, rng: &mut Xoshiro256PlusPlus) {
        let n_rel = self.config.n_relations;
        let mut subj: Vec<usize> = (0..self.subjects.len()).collect();
        subj.shuffle(rng);
        let mut probed: HashSet<(usize, usize)> = HashSet::new();
        for &s in subj.iter().take(self.config.n_edits) {
            let r = rng.random_range(0..n_rel);
            let spec = &RELATIONS[r];
            let o = self.objects[s][r];
            let mut o_new = rng.random_range(0..spec.objects.len() - 1);
            if o_new >= o {
                o_new += 1;
            }
            let t = rng.random_range(0..spec.templates.len());
            let rephrase: Vec<String> = (0..spec.templates.len())
                .filter(|&u| u != t)
                .map(|u| self.prompt(s, r, u))
                .collect();
            let mut same: Vec<usize> =
                (0..self.subjects.len()).filter(|&x| x != s && self.objects[x][r] == o).collect();
            same.shuffle(rng);
            same.truncate(self.config.neighbours);
            let mut neighbourhood = Vec::new();
            let mut nb_probes = Vec::new();
            for &x in &same {
                let p = self.prompt(x, r, rng.random_range(0..spec.templates.len()));
                neighbourhood.push(p.clone());
                nb_probes.push(QaPair::new(p, spec.objects[o]));
                probed.insert((x, r));
            }
            let same_subject: Vec<QaPair> = (0..n_rel)
                .filter(|&q| q != r)
                .map(|q| {
                    probed.insert((s, q));
                    let t = rng.random_range(0..RELATIONS[q].templates.len());
                    QaPair::new(self.prompt(s, q, t), self.object(s, q))
                })
                .collect();
            probed.insert((s, r));
            let mut locality = BTreeMap::new();
            if !same_subject.is_empty() {
                locality.insert("same_subject".to_string(), same_subject);
            }
            if !nb_probes.is_empty() {
                locality.insert("neighbourhood".to_string(), nb_probes);
            }
            self.edits.push(EditRequest {
                prompt: spec.templates[t].to_string(),
                subject: Some(self.subjects[s].clone()),
                target_new: spec.objects[o_new].to_string(),
                target_true: Some(spec.objects[o].to_string()),
                rephrase,
                neighbourhood,
                locality,
                portability: BTreeMap::new(),
                generation_prompts: vec![],
            });
            self.edited.push((s, r, o_new));
        }
        for s in 0..self.subjects.len() {
            for (r, spec) in RELATIONS.iter().enumerate().take(n_rel) {
                if !probed.contains(&(s, r)) {
                    let t = rng.random_range(0..spec.templates.len());
                    self.locality_pool.push(QaPair::new(self.prompt(s, r, t), self.object(s, r)));
                }
            }
        }
    }

    /// The training corpus: `docs_per_subject` biographies per subject, each stating all of the
    /// subject's facts in a random order with random templates, shuffled.
    pub fn corpus(&self) -> Vec<String> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.config.seed.wrapping_add(1));
        let n_rel = self.config.n_relations;
        let mut docs = Vec::with_capacity(self.subjects.len() * self.config.docs_per_subject);
        for _ in 0..self.config.docs_per_subject {
            for s in 0..self.subjects.len() {
                let mut rels: Vec<usize> = (0..n_rel).collect();
                rels.shuffle(&mut rng);
                let sentences: Vec<String> = rels
                    .iter()
                    .map(|&r| {
                        let t = rng.random_range(0..RELATIONS[r].templates.len());
                        format!("{} {}.", self.prompt(s, r, t), self.object(s, r))
                    })
                    .collect();
                docs.push(sentences.join(" "));
            }
        }
        docs.shuffle(&mut rng);
        docs
    }

    /// The tiny-model recipe of the task: 4 layers of width 128 (about 0.8 M parameters with a
    /// 512-token BPE vocabulary), 600 steps of 32 documents at lr 3e-3 (cosine to 10 %). About
    /// two minutes on 2 idle cores in release; it learns every fact of the default task.
    pub fn recipe() -> TinyRecipe {
        TinyRecipe {
            tokenizer: TokenizerRecipe { vocab_size: 512, min_frequency: 2 },
            model: TinyModelRecipe {
                n_layer: 4,
                n_head: 4,
                n_embd: 128,
                n_positions: 96,
                dropout: 0.0,
            },
            train: TinyTrainRecipe {
                steps: 600,
                batch_size: 32,
                lr: 3e-3,
                warmup_steps: 50,
                ..TinyTrainRecipe::default()
            },
            seed: 0,
        }
    }

    /// Loads the task's model from `cache_dir` (see [`default_model_cache`]) or trains it there
    /// (cached by a hash of the recipe and the corpus).
    ///
    /// # Errors
    /// Training, loading and saving errors ([`Error::Model`]).
    pub fn model(
        &self,
        recipe: &TinyRecipe,
        cache_dir: &Path,
        run: &RunOptions,
    ) -> Result<(Gpt2, TinyModelReport, PathBuf)> {
        Ok(load_or_train(cache_dir, &self.corpus(), recipe, run)?)
    }

    /// Preference pairs for ProFS on this task: suppress object `suppressed` of relation
    /// `relation`. For every subject whose object is another one, and every template, the
    /// preferred text states the true fact and the dis-preferred text the same sentence with the
    /// suppressed object (`"{prompt} {object}."`).
    pub fn preference_pairs(&self, relation: usize, suppressed: usize) -> Vec<PreferencePair> {
        let spec = &RELATIONS[relation];
        let mut out = Vec::new();
        for s in 0..self.subjects.len() {
            if self.objects[s][relation] == suppressed {
                continue;
            }
            for t in 0..spec.templates.len() {
                let p = self.prompt(s, relation, t);
                out.push(PreferencePair::new(
                    format!("{p} {}.", self.object(s, relation)),
                    format!("{p} {}.", spec.objects[suppressed]),
                ));
            }
        }
        out
    }

    /// The most frequent object of `relation` (the default suppression target).
    pub fn most_common_object(&self, relation: usize) -> usize {
        let mut counts = vec![0usize; RELATIONS[relation].objects.len()];
        for o in &self.objects {
            counts[o[relation]] += 1;
        }
        counts.iter().enumerate().max_by_key(|&(i, c)| (*c, usize::MAX - i)).map_or(0, |(i, _)| i)
    }

    /// How `model` answers the facts: for each `(subject, relation, template)` the object with
    /// the lowest mean NLL among the relation's objects.
    ///
    /// Returns, per relation, the fraction of prompts whose choice is the true object, and for
    /// `suppressed = Some((r, o))` the fraction of relation-`r` prompts whose choice is `o`
    /// (overall and among subjects whose true object is `o`).
    ///
    /// # Errors
    /// Model errors.
    pub fn answer_stats<M: CausalLm + ?Sized>(
        &self,
        model: &M,
        suppressed: Option<(usize, usize)>,
        batch_size: usize,
    ) -> Result<AnswerStats> {
        let mut items: Vec<(String, &'static str)> = Vec::new();
        let mut keys = Vec::new();
        for s in 0..self.subjects.len() {
            for (r, spec) in self.relations().iter().enumerate() {
                for t in 0..spec.templates.len() {
                    let p = self.prompt(s, r, t);
                    for &o in spec.objects {
                        items.push((p.clone(), o));
                    }
                    keys.push((s, r));
                }
            }
        }
        let refs: Vec<(&str, &str)> = items.iter().map(|(p, o)| (p.as_str(), *o)).collect();
        let scores = score_answers(model, &refs, batch_size)?;
        let n_rel = self.config.n_relations;
        let mut correct = vec![(0usize, 0usize); n_rel];
        let (mut sup_all, mut sup_own) = ((0usize, 0usize), (0usize, 0usize));
        let mut at = 0;
        for &(s, r) in &keys {
            let n_obj = RELATIONS[r].objects.len();
            let block = &scores[at..at + n_obj];
            at += n_obj;
            let choice = block
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.mean_nll.total_cmp(&b.1.mean_nll))
                .map_or(0, |(i, _)| i);
            correct[r].1 += 1;
            if choice == self.objects[s][r] {
                correct[r].0 += 1;
            }
            if let Some((sr, so)) = suppressed
                && sr == r
            {
                sup_all.1 += 1;
                sup_all.0 += usize::from(choice == so);
                if self.objects[s][r] == so {
                    sup_own.1 += 1;
                    sup_own.0 += usize::from(choice == so);
                }
            }
        }
        let frac = |(a, b): (usize, usize)| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Ok(AnswerStats {
            accuracy: self
                .relations()
                .iter()
                .zip(&correct)
                .map(|(spec, &c)| (spec.name.to_string(), frac(c)))
                .collect(),
            suppressed_rate: suppressed.map(|_| frac(sup_all)),
            suppressed_rate_own: suppressed.map(|_| frac(sup_own)),
        })
    }
}

/// How a model answers the task's facts (see [`FactTask::answer_stats`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerStats {
    /// Per relation: share of prompts whose lowest-NLL object is the true one.
    pub accuracy: BTreeMap<String, f64>,
    /// Share of the suppressed relation's prompts answered with the suppressed object.
    pub suppressed_rate: Option<f64>,
    /// The same among subjects whose true object is the suppressed one.
    pub suppressed_rate_own: Option<f64>,
}

/// The cache of trained task models (re-exported from [`amend_models::recipe`]):
/// `<cache root>/models`, where the root is `$AMEND_CACHE_DIR`, else `$XDG_CACHE_HOME/amend`,
/// else `~/.cache/amend`.
pub use amend_models::recipe::default_model_cache;
