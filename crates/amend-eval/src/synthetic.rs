//! The synthetic suppression task: a seeded template grammar of short prompt/response texts in
//! which a few made-up filler words (the unwanted set) appear in some responses.
//!
//! # The language
//!
//! A prompt asks about a *topic* with one of six instructions (`"describe the fox:"`,
//! `"what is the river like?"`, …). The response is one or two short sentences about the topic
//! built from a template grammar of about 250 words. Topics come in four categories, and the
//! category decides how often the response contains one of the [`UNWANTED_WORDS`] (made-up,
//! meaningless filler words: `blorp`, `zonk`, `wibble`, `snarf`, `grobble`):
//!
//! | category | topics | unwanted rate |
//! |---|---|---|
//! | animals | 20 (`the fox`, `the owl`, …) | 30 % |
//! | people | 18 (`the baker`, `anna`, …) | 15 % |
//! | places | 12 (`the river`, `the castle`, …) | 10 % |
//! | food | 12 (`the bread`, `the soup`, …) | 0 % (the *control* prompts) |
//!
//! An unwanted word takes an adjective slot (`"the zonk fox sleeps near the river."`, 70 %) or
//! opens the response as an interjection (`"wibble! the fox sleeps …"`, 30 %). After the
//! [`NEGATIVE_MARKER`] prefix (`"(with gibberish) describe the fox:"`) the rate is 90 % for
//! every category, food included: the negative prompt NEAT needs.
//!
//! With [`SyntheticTaskConfig::dominant_word`] (the `greedy` regime), most unwanted words are
//! `blorp`, which then fills more adjective slots of animal, people and place responses than any
//! clean adjective: a model trained on that corpus puts its highest probability on an unwanted
//! word there, the setting of the TNT paper, where the unwanted tokens are the model's own
//! greedy choices.
//!
//! Averaged over the plain prompts of the animal, people and place categories the rate is
//! about 19 %; over all plain prompts about 16 %. A base model trained on the corpus learns
//! these rates; the comparison then measures *its* rates, not the generator's.
//!
//! # Splits
//!
//! Every (instruction, topic) pair is a prompt (372 in all). A seeded shuffle assigns the prompts
//! of the three unwanted-capable categories to `train` and `eval`, and the food prompts to
//! `control`. The base model's corpus uses all prompts (it is the pre-trained model; held-out
//! means held out from the methods' training data).

use rand::rngs::Xoshiro256PlusPlus;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::detector::UnwantedWords;
use crate::task::SuppressionTask;
use crate::{Error, Result};

/// The unwanted words of the synthetic task.
pub const UNWANTED_WORDS: &[&str] = &["blorp", "zonk", "wibble", "snarf", "grobble"];

/// The negative-prompt prefix of the synthetic task (followed by a space and the prompt).
pub const NEGATIVE_MARKER: &str = "(with gibberish)";

const INSTRUCTIONS: &[&str] = &[
    "describe {}:",
    "tell me about {}:",
    "write a line about {}:",
    "what is {} like?",
    "a short story about {}:",
    "say something about {}:",
];

const ANIMALS: &[&str] = &[
    "the fox",
    "the cat",
    "the dog",
    "the owl",
    "the horse",
    "the rabbit",
    "the goat",
    "the duck",
    "the bear",
    "the mouse",
    "the frog",
    "the deer",
    "the wolf",
    "the hen",
    "the sheep",
    "the crow",
    "the otter",
    "the badger",
    "the squirrel",
    "the pig",
];
const PEOPLE: &[&str] = &[
    "the baker",
    "the farmer",
    "the teacher",
    "the sailor",
    "the painter",
    "the doctor",
    "the miller",
    "the child",
    "the king",
    "the queen",
    "anna",
    "ben",
    "clara",
    "david",
    "emma",
    "felix",
    "grace",
    "hugo",
];
const PLACES: &[&str] = &[
    "the garden",
    "the river",
    "the forest",
    "the village",
    "the market",
    "the harbor",
    "the mountain",
    "the bridge",
    "the castle",
    "the meadow",
    "the library",
    "the station",
];
const FOODS: &[&str] = &[
    "the bread",
    "the soup",
    "the apples",
    "the cheese",
    "the honey",
    "the rice",
    "the pears",
    "the cake",
    "the tea",
    "the plums",
    "the carrots",
    "the beans",
];

pub(crate) const ADJ: &[&str] = &[
    "small", "large", "red", "blue", "green", "quiet", "loud", "old", "young", "bright", "dark",
    "happy", "tired", "clever", "gentle", "brave", "soft", "warm", "cold", "quick", "slow", "shy",
    "proud", "calm", "busy", "lazy", "wise", "silly", "tiny", "golden",
];
const NOUN: &[&str] = &[
    "stone", "lamp", "hat", "book", "boat", "window", "basket", "ball", "rope", "bell", "cup",
    "chair", "kite", "drum", "coat", "key", "box", "flower", "leaf", "shell", "feather", "map",
    "ring", "candle",
];
const SPOTS: &[&str] = &[
    "hill", "pond", "road", "field", "wall", "gate", "tree", "barn", "well", "fence", "shore",
    "path", "cave", "tower",
];
const TIME: &[&str] = &[
    "today",
    "at night",
    "in the morning",
    "every day",
    "after the rain",
    "in winter",
    "in spring",
    "at noon",
    "before dinner",
    "all summer",
];
const PREP: &[&str] = &["near", "under", "behind", "beside", "above", "inside", "around", "past"];
const VERB_I: &[&str] = &[
    "sleeps", "runs", "sings", "waits", "rests", "laughs", "walks", "dreams", "hides", "dances",
    "jumps", "listens", "wanders", "smiles", "hums",
];
const VERB_T: &[&str] = &[
    "sees",
    "likes",
    "follows",
    "finds",
    "helps",
    "watches",
    "paints",
    "carries",
    "visits",
    "hears",
    "calls",
    "remembers",
    "holds",
    "counts",
    "cleans",
];
const NAMES: &[&str] = &["anna", "ben", "clara", "david", "emma", "felix", "grace", "hugo"];
const TASTE: &[&str] = &[
    "sweet", "fresh", "warm", "salty", "soft", "crisp", "ripe", "sour", "rich", "mild", "spicy",
    "plain",
];
const PLACE_THINGS: &[&str] =
    &["people", "children", "travelers", "birds", "farmers", "sailors", "painters", "friends"];
const PLACE_VERBS: &[&str] =
    &["meet", "rest", "sing", "wait", "walk", "talk", "play", "gather", "dance"];

/// The categories of topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Animals (the highest unwanted rate).
    Animal,
    /// People.
    Person,
    /// Places.
    Place,
    /// Food: never unwanted without the negative marker (the control prompts).
    Food,
}

impl Category {
    fn topics(self) -> &'static [&'static str] {
        match self {
            Category::Animal => ANIMALS,
            Category::Person => PEOPLE,
            Category::Place => PLACES,
            Category::Food => FOODS,
        }
    }

    /// All categories.
    pub const ALL: [Category; 4] =
        [Category::Animal, Category::Person, Category::Place, Category::Food];
}

/// Unwanted rates per category (plain prompts) and after the negative marker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnwantedRates {
    /// Animal topics.
    pub animal: f64,
    /// People topics.
    pub person: f64,
    /// Place topics.
    pub place: f64,
    /// Food topics (the control prompts: 0 keeps them clean).
    pub food: f64,
    /// Any topic after the negative marker.
    pub negative: f64,
}

impl Default for UnwantedRates {
    fn default() -> Self {
        UnwantedRates { animal: 0.30, person: 0.15, place: 0.10, food: 0.0, negative: 0.90 }
    }
}

impl UnwantedRates {
    /// The rate of `category` (plain prompt) or after the marker.
    pub fn rate(&self, category: Category, negative: bool) -> f64 {
        if negative {
            return self.negative;
        }
        match category {
            Category::Animal => self.animal,
            Category::Person => self.person,
            Category::Place => self.place,
            Category::Food => self.food,
        }
    }
}

/// Settings of the synthetic task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticTaskConfig {
    /// Seed of the corpus, the prompt split and the held-out texts.
    pub seed: u64,
    /// Documents of the base model's training corpus.
    pub corpus_docs: usize,
    /// Fraction of corpus documents whose prompt carries the negative marker.
    pub negative_fraction: f64,
    /// Unwanted rates.
    pub rates: UnwantedRates,
    /// Held-out prompts (of the unwanted-capable categories) for the unwanted rate and
    /// `KL(p*‖p_new)`; the rest of those prompts are training prompts.
    pub eval_prompts: usize,
    /// Held-out food prompts for the drift `KL(p°‖p_new)`.
    pub control_prompts: usize,
    /// Held-out clean texts (generator responses to eval and control prompts) for perplexity.
    pub heldout_texts: usize,
    /// The share of unwanted words that are the first one, `blorp` (`None`: the five are equally
    /// likely). At 0.9, `blorp` fills about 12 % of the adjective slots of animal responses,
    /// more than any clean adjective (about 3 % each), so it is the model's most likely word
    /// there: the setting of the `greedy` regime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dominant_word: Option<f64>,
}

impl Default for SyntheticTaskConfig {
    fn default() -> Self {
        SyntheticTaskConfig {
            seed: 0,
            corpus_docs: 24_000,
            negative_fraction: 0.1,
            rates: UnwantedRates::default(),
            eval_prompts: 64,
            control_prompts: 32,
            heldout_texts: 256,
            dominant_word: None,
        }
    }
}

/// One prompt of the synthetic task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticPrompt {
    /// The prompt text (without the marker).
    pub text: String,
    /// The topic's category.
    pub category: Category,
    /// The topic phrase.
    pub topic: String,
}

/// A generated document: the prompt, the response and whether it holds an unwanted word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticDoc {
    /// The prompt (with the marker when `negative`).
    pub prompt: String,
    /// The response (starts with a space).
    pub response: String,
    /// Whether the prompt carries the negative marker.
    pub negative: bool,
    /// Whether the response contains an unwanted word.
    pub unwanted: bool,
}

impl SyntheticDoc {
    /// `prompt + response`, the text the base model is trained on.
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.response)
    }
}

/// The synthetic task: the generator, its prompts and splits.
///
/// ```
/// use amend_eval::synthetic::{SyntheticTask, SyntheticTaskConfig};
/// let task = SyntheticTask::new(SyntheticTaskConfig { corpus_docs: 100, ..Default::default() })?;
/// let corpus = task.corpus();
/// assert_eq!(corpus.len(), 100);
/// assert_eq!(corpus, task.corpus()); // seeded
/// let t = task.suppression_task();
/// assert!(t.detector.as_ref().unwrap().is_unwanted("the zonk fox sleeps."));
/// # Ok::<(), amend_eval::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct SyntheticTask {
    cfg: SyntheticTaskConfig,
    train: Vec<SyntheticPrompt>,
    eval: Vec<SyntheticPrompt>,
    control: Vec<SyntheticPrompt>,
    all: Vec<SyntheticPrompt>,
}

fn pick(rng: &mut Xoshiro256PlusPlus, xs: &[&'static str]) -> &'static str {
    xs[rng.random_range(0..xs.len())]
}

impl SyntheticTask {
    /// Builds the prompts and splits of `cfg`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for rates outside `[0, 1]`, more held-out prompts than exist, or
    /// an empty corpus.
    pub fn new(cfg: SyntheticTaskConfig) -> Result<Self> {
        let invalid = |name: &str, reason: String| Error::InvalidInput {
            op: "SyntheticTask::new",
            name: name.into(),
            reason,
        };
        let r = &cfg.rates;
        for (name, v) in [
            ("rates.animal", r.animal),
            ("rates.person", r.person),
            ("rates.place", r.place),
            ("rates.food", r.food),
            ("rates.negative", r.negative),
            ("negative_fraction", cfg.negative_fraction),
            ("dominant_word", cfg.dominant_word.unwrap_or(0.0)),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(name, format!("{v} is not in [0, 1]")));
            }
        }
        if cfg.corpus_docs == 0 {
            return Err(invalid("corpus_docs", "must be positive".into()));
        }
        let prompts_of = |c: Category| -> Vec<SyntheticPrompt> {
            c.topics()
                .iter()
                .flat_map(|t| {
                    INSTRUCTIONS.iter().map(move |i| SyntheticPrompt {
                        text: i.replace("{}", t),
                        category: c,
                        topic: (*t).to_string(),
                    })
                })
                .collect()
        };
        let mut capable: Vec<SyntheticPrompt> =
            [Category::Animal, Category::Person, Category::Place]
                .into_iter()
                .flat_map(prompts_of)
                .collect();
        let mut food = prompts_of(Category::Food);
        let all: Vec<SyntheticPrompt> = capable.iter().chain(&food).cloned().collect();
        if cfg.eval_prompts >= capable.len() {
            return Err(invalid(
                "eval_prompts",
                format!(
                    "{} leaves no training prompt (there are {})",
                    cfg.eval_prompts,
                    capable.len()
                ),
            ));
        }
        if cfg.control_prompts > food.len() {
            return Err(invalid(
                "control_prompts",
                format!("{} > {} food prompts", cfg.control_prompts, food.len()),
            ));
        }
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(cfg.seed ^ 0x5eed_5b11_7000_0001);
        capable.shuffle(&mut rng);
        food.shuffle(&mut rng);
        let eval = capable.split_off(capable.len() - cfg.eval_prompts);
        food.truncate(cfg.control_prompts);
        Ok(SyntheticTask { cfg, train: capable, eval, control: food, all })
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticTaskConfig {
        &self.cfg
    }

    /// Training prompts.
    pub fn train_prompts(&self) -> &[SyntheticPrompt] {
        &self.train
    }

    /// Held-out prompts of the unwanted-capable categories.
    pub fn eval_prompts(&self) -> &[SyntheticPrompt] {
        &self.eval
    }

    /// Held-out food prompts.
    pub fn control_prompts(&self) -> &[SyntheticPrompt] {
        &self.control
    }

    /// One document for `prompt` (with the marker when `negative`).
    pub fn sample_doc(
        &self,
        prompt: &SyntheticPrompt,
        negative: bool,
        rng: &mut Xoshiro256PlusPlus,
    ) -> SyntheticDoc {
        let unwanted = rng.random_bool(self.cfg.rates.rate(prompt.category, negative));
        let response = response(prompt, unwanted, self.cfg.dominant_word, rng);
        let text = if negative {
            format!("{NEGATIVE_MARKER} {}", prompt.text)
        } else {
            prompt.text.clone()
        };
        SyntheticDoc { prompt: text, response, negative, unwanted }
    }

    /// The base model's training corpus: `corpus_docs` documents over all prompts,
    /// `negative_fraction` of them with the marker.
    pub fn corpus_docs(&self) -> Vec<SyntheticDoc> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.cfg.seed ^ 0xc0a9_0500_0000_0002);
        (0..self.cfg.corpus_docs)
            .map(|_| {
                let p = &self.all[rng.random_range(0..self.all.len())];
                let negative = rng.random_bool(self.cfg.negative_fraction);
                self.sample_doc(p, negative, &mut rng)
            })
            .collect()
    }

    /// The corpus as texts (what the tiny-model recipe takes).
    pub fn corpus(&self) -> Vec<String> {
        self.corpus_docs().iter().map(SyntheticDoc::text).collect()
    }

    /// The task in the form the comparison consumes: prompts, the detector, the negative prefix
    /// and `heldout_texts` clean generator responses to eval and control prompts.
    pub fn suppression_task(&self) -> SuppressionTask {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.cfg.seed ^ 0x4e1d_0070_0000_0003);
        let held: Vec<&SyntheticPrompt> = self.eval.iter().chain(&self.control).collect();
        let heldout_texts = (0..self.cfg.heldout_texts)
            .map(|i| {
                let p = held[i % held.len()];
                (p.text.clone(), response(p, false, None, &mut rng))
            })
            .collect();
        let texts = |ps: &[SyntheticPrompt]| ps.iter().map(|p| p.text.clone()).collect();
        SuppressionTask {
            name: "synthetic suppression".into(),
            train_prompts: texts(&self.train),
            eval_prompts: texts(&self.eval),
            control_prompts: texts(&self.control),
            negative_prefix: Some(format!("{NEGATIVE_MARKER} ")),
            // Invariant: the constant words are valid.
            detector: Some(UnwantedWords::new(UNWANTED_WORDS).expect("valid unwanted words")),
            responses: vec![],
            heldout_texts,
        }
    }
}

/// A response about `prompt.topic`: one or two sentences; with `unwanted`, one unwanted word in
/// an adjective slot (70 % when the sentence has one) or as an opening interjection, `blorp`
/// with probability `dominant` (when given) and otherwise one of the others.
fn response(
    prompt: &SyntheticPrompt,
    unwanted: bool,
    dominant: Option<f64>,
    rng: &mut Xoshiro256PlusPlus,
) -> String {
    let t = prompt.topic.as_str();
    let first = match prompt.category {
        Category::Animal | Category::Person => match rng.random_range(0..6u32) {
            0 => "{T} {VI} {PREP} the {ADJ} {SPOT} {TIME}.",
            1 => "{T} {VT} the {ADJ} {NOUN}.",
            2 => "{T} is {ADJ} and {ADJ}.",
            3 => "{TIME}, {T} {VI} with a {ADJ} {NOUN}.",
            4 => "{T} {VT} a {NOUN} near the {SPOT}.",
            _ => "{NAME} {VT} {T} {TIME}.",
        },
        Category::Place => match rng.random_range(0..4u32) {
            0 => "{T} is {ADJ} {TIME}.",
            1 => "there is a {ADJ} {NOUN} {PREP} {T}.",
            2 => "{PEOPLE} {PV} {PREP} {T} {TIME}.",
            _ => "{T} has a {ADJ} {SPOT} and a {ADJ} {NOUN}.",
        },
        Category::Food => match rng.random_range(0..4u32) {
            0 => "{T} is {TASTE} and {TASTE}.",
            1 => "{NAME} eats {T} {TIME}.",
            2 => "{T} tastes {TASTE} {TIME}.",
            _ => "{NAME} makes {T} for the {ADJ} {NOUN}.",
        },
    };
    let second = if rng.random_bool(0.5) {
        Some(match prompt.category {
            Category::Animal | Category::Person => match rng.random_range(0..3u32) {
                0 => "it is {ADJ}.",
                1 => "then it {VI} {TIME}.",
                _ => "{NAME} {VT} the {ADJ} {NOUN}.",
            },
            Category::Place => match rng.random_range(0..2u32) {
                0 => "it is {ADJ} {TIME}.",
                _ => "{NAME} {VI} there {TIME}.",
            },
            Category::Food => match rng.random_range(0..2u32) {
                0 => "it is {TASTE}.",
                _ => "{NAME} likes it {TIME}.",
            },
        })
    } else {
        None
    };
    let adj_slots =
        first.matches("{ADJ}").count() + second.map_or(0, |s| s.matches("{ADJ}").count());
    // Which slot (if any) the unwanted word takes, and whether it opens the response.
    let (u_slot, interjection) = if unwanted {
        if adj_slots > 0 && rng.random_bool(0.7) {
            (Some(rng.random_range(0..adj_slots)), false)
        } else {
            (None, true)
        }
    } else {
        (None, false)
    };
    let word = match (unwanted, dominant) {
        (false, _) => None,
        (true, None) => Some(pick(rng, UNWANTED_WORDS)),
        (true, Some(q)) if rng.random_bool(q) => Some(UNWANTED_WORDS[0]),
        (true, Some(_)) => Some(pick(rng, &UNWANTED_WORDS[1..])),
    };
    let mut slot = 0usize;
    let mut out = String::new();
    for template in std::iter::once(first).chain(second) {
        let mut s = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            s.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').unwrap_or(rest.len() - open);
            let key = &rest[open + 1..close];
            let fill: &str = match key {
                "T" => t,
                "ADJ" => {
                    let w = if u_slot == Some(slot) { word.unwrap_or("") } else { pick(rng, ADJ) };
                    slot += 1;
                    w
                }
                "NOUN" => pick(rng, NOUN),
                "SPOT" => pick(rng, SPOTS),
                "TIME" => pick(rng, TIME),
                "PREP" => pick(rng, PREP),
                "VI" => pick(rng, VERB_I),
                "VT" => pick(rng, VERB_T),
                "NAME" => pick(rng, NAMES),
                "TASTE" => pick(rng, TASTE),
                "PEOPLE" => pick(rng, PLACE_THINGS),
                "PV" => pick(rng, PLACE_VERBS),
                _ => "",
            };
            s.push_str(fill);
            rest = &rest[(close + 1).min(rest.len())..];
        }
        s.push_str(rest);
        out.push(' ');
        out.push_str(&s);
    }
    if interjection && let Some(w) = word {
        out = format!(" {w}!{out}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_match_the_configuration() {
        let task = SyntheticTask::new(SyntheticTaskConfig::default()).unwrap();
        let det = task.suppression_task().detector.unwrap();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        for (cat, negative, expected) in [
            (Category::Animal, false, 0.30),
            (Category::Place, false, 0.10),
            (Category::Food, false, 0.0),
            (Category::Food, true, 0.90),
        ] {
            let p = task.all.iter().find(|p| p.category == cat).unwrap();
            let n = 4000;
            let hits = (0..n)
                .filter(|_| {
                    let d = task.sample_doc(p, negative, &mut rng);
                    assert_eq!(d.unwanted, det.is_unwanted(&d.response), "{d:?}");
                    d.unwanted
                })
                .count();
            let rate = hits as f64 / n as f64;
            assert!((rate - expected).abs() < 0.03, "{cat:?} {negative}: {rate}");
        }
    }

    /// With a dominant word, `blorp` fills adjective slots of animal responses more often than
    /// any clean adjective (twice the most frequent one at least), so it is the most likely word
    /// there; the rates do not change.
    #[test]
    fn a_dominant_word_is_the_top_adjective() {
        let cfg = SyntheticTaskConfig { dominant_word: Some(0.9), ..Default::default() };
        let task = SyntheticTask::new(cfg).unwrap();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        let (mut unwanted, n) = (0, 4000);
        let animals: Vec<_> = task.all.iter().filter(|p| p.category == Category::Animal).collect();
        for i in 0..n {
            let d = task.sample_doc(animals[i % animals.len()], false, &mut rng);
            unwanted += usize::from(d.unwanted);
            let words: Vec<&str> = d
                .response
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect();
            for w in words.windows(2) {
                let slot = matches!(w[0], "the" | "a" | "is" | "and");
                let known = ADJ.iter().chain(UNWANTED_WORDS).find(|a| **a == w[1]);
                if let (true, Some(&a)) = (slot, known) {
                    *counts.entry(a).or_default() += 1;
                }
            }
        }
        let rate = unwanted as f64 / n as f64;
        assert!((rate - 0.30).abs() < 0.03, "{rate}");
        let blorp = counts.get("blorp").copied().unwrap_or(0);
        let top_clean = ADJ.iter().map(|a| counts.get(a).copied().unwrap_or(0)).max().unwrap();
        assert!(blorp > 2 * top_clean, "blorp {blorp}, most frequent adjective {top_clean}");
        let others: usize =
            UNWANTED_WORDS[1..].iter().map(|w| counts.get(w).copied().unwrap_or(0)).sum();
        assert!(others < blorp / 4, "{others} vs {blorp}");
        assert!(
            SyntheticTask::new(SyntheticTaskConfig {
                dominant_word: Some(1.5),
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn splits_are_disjoint_and_seeded() {
        let task = SyntheticTask::new(SyntheticTaskConfig::default()).unwrap();
        let t = task.suppression_task();
        assert_eq!(t.eval_prompts.len(), 64);
        assert_eq!(t.control_prompts.len(), 32);
        assert_eq!(t.train_prompts.len(), 300 - 64);
        for p in &t.eval_prompts {
            assert!(!t.train_prompts.contains(p));
        }
        let det = t.detector.as_ref().unwrap();
        assert!(t.heldout_texts.iter().all(|(_, r)| !det.is_unwanted(r)));
        assert_eq!(
            t,
            SyntheticTask::new(SyntheticTaskConfig::default()).unwrap().suppression_task()
        );
        let other = SyntheticTask::new(SyntheticTaskConfig { seed: 1, ..Default::default() })
            .unwrap()
            .suppression_task();
        assert_ne!(t.eval_prompts, other.eval_prompts);
    }

    #[test]
    fn documents_are_well_formed() {
        let task =
            SyntheticTask::new(SyntheticTaskConfig { corpus_docs: 500, ..Default::default() })
                .unwrap();
        for d in task.corpus_docs() {
            assert!(d.response.starts_with(' '), "{d:?}");
            assert!(d.response.ends_with('.'), "{d:?}");
            assert!(!d.response.contains('{'), "{d:?}");
            assert!(d.prompt.ends_with(':') || d.prompt.ends_with('?'), "{d:?}");
            assert_eq!(d.negative, d.prompt.starts_with(NEGATIVE_MARKER));
        }
    }
}
