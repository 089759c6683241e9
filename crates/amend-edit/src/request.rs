//! Edit requests (spec B.1) and their validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use amend_models::CausalLm;

use crate::{Error, Result};

/// A prompt with its expected answer (locality and portability probes, locality facts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QaPair {
    /// The prompt.
    pub prompt: String,
    /// The answer (scored as `" " + answer`).
    #[serde(alias = "ground_truth", alias = "target")]
    pub answer: String,
}

impl QaPair {
    /// A pair.
    pub fn new(prompt: impl Into<String>, answer: impl Into<String>) -> Self {
        QaPair { prompt: prompt.into(), answer: answer.into() }
    }
}

/// One edit request (spec B.1; CounterFact / EasyEdit fields).
///
/// Targets are scored and trained as `" " + target` (leading space). When `subject` is set and
/// `prompt` contains `{}`, the subject is substituted (CounterFact's format); otherwise `prompt`
/// is used as is.
///
/// ```
/// use amend_edit::EditRequest;
/// let r = EditRequest::new("{} lives in", "Paris").with_subject("Ana Koss").with_target_true("Rome");
/// assert_eq!(r.rewrite_prompt(), "Ana Koss lives in");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EditRequest {
    /// The rewrite prompt (subject substituted, or containing `{}`).
    pub prompt: String,
    /// The subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// The new answer.
    pub target_new: String,
    /// The answer before the edit (needed by the probability-comparison metrics, the
    /// neighbourhood prompts and locality augmentation).
    #[serde(default, alias = "ground_truth")]
    pub target_true: Option<String>,
    /// Paraphrases of the rewrite prompt (generalisation).
    #[serde(default, alias = "rephrase_prompts", alias = "paraphrase_prompts")]
    pub rephrase: Vec<String>,
    /// Neighbourhood prompts: other subjects whose answer is `target_true` (must not change).
    #[serde(default, alias = "neighborhood", alias = "neighborhood_prompts")]
    pub neighbourhood: Vec<String>,
    /// Locality probes by name: prompts with their own answers (must not change).
    #[serde(default)]
    pub locality: BTreeMap<String, Vec<QaPair>>,
    /// Portability probes by name: prompts whose answer should follow from the edit.
    #[serde(default)]
    pub portability: BTreeMap<String, Vec<QaPair>>,
    /// Prompts for the fluency generations (default: the rewrite prompt).
    #[serde(default)]
    pub generation_prompts: Vec<String>,
}

impl EditRequest {
    /// A request with a prompt and a new target.
    pub fn new(prompt: impl Into<String>, target_new: impl Into<String>) -> Self {
        EditRequest { prompt: prompt.into(), target_new: target_new.into(), ..Default::default() }
    }

    /// Sets the subject.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the old answer.
    pub fn with_target_true(mut self, t: impl Into<String>) -> Self {
        self.target_true = Some(t.into());
        self
    }

    /// Adds paraphrase prompts.
    pub fn with_rephrase(mut self, r: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.rephrase.extend(r.into_iter().map(Into::into));
        self
    }

    /// Adds neighbourhood prompts.
    pub fn with_neighbourhood(mut self, n: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.neighbourhood.extend(n.into_iter().map(Into::into));
        self
    }

    /// The rewrite prompt with the subject substituted.
    pub fn rewrite_prompt(&self) -> String {
        self.substitute(&self.prompt)
    }

    /// `text` with `{}` replaced by the subject (when there is one).
    pub fn substitute(&self, text: &str) -> String {
        match &self.subject {
            Some(s) if text.contains("{}") => text.replace("{}", s),
            _ => text.to_string(),
        }
    }

    /// Checks the request's texts (non-empty prompts and targets) without a tokenizer.
    ///
    /// # Errors
    /// [`Error::InvalidEdit`] naming the request and field.
    pub fn validate(&self, index: usize) -> Result<()> {
        let bad = |field: String, reason: &str| Error::InvalidEdit {
            index,
            field,
            reason: reason.to_string(),
        };
        // `{}` is the subject's placeholder (CounterFact's format): without a subject it would
        // be trained and scored literally.
        match &self.subject {
            Some(s) if s.trim().is_empty() => return Err(bad("subject".into(), "empty subject")),
            Some(_) => {}
            None => {
                let templated = std::iter::once(("prompt".to_string(), &self.prompt))
                    .chain(
                        self.rephrase
                            .iter()
                            .enumerate()
                            .map(|(i, p)| (format!("rephrase[{i}]"), p)),
                    )
                    .chain(
                        self.generation_prompts
                            .iter()
                            .enumerate()
                            .map(|(i, p)| (format!("generation_prompts[{i}]"), p)),
                    )
                    .find(|(_, p)| p.contains("{}"));
                if let Some((field, _)) = templated {
                    return Err(bad(
                        field,
                        "contains the subject placeholder `{}` but the request has no `subject`; \
                         add \"subject\" or write the subject into the prompt",
                    ));
                }
            }
        }
        if self.rewrite_prompt().trim().is_empty() {
            return Err(bad("prompt".into(), "empty prompt"));
        }
        if self.target_new.trim().is_empty() {
            return Err(bad("target_new".into(), "empty target"));
        }
        if let Some(t) = &self.target_true {
            if t.trim().is_empty() {
                return Err(bad("target_true".into(), "empty target"));
            }
            if t == &self.target_new {
                return Err(bad("target_true".into(), "equals target_new: nothing to edit"));
            }
        }
        for (i, p) in self.rephrase.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(bad(format!("rephrase[{i}]"), "empty prompt"));
            }
        }
        if !self.neighbourhood.is_empty() && self.target_true.is_none() {
            return Err(bad(
                "neighbourhood".into(),
                "neighbourhood prompts need target_true (their expected answer)",
            ));
        }
        for (i, p) in self.neighbourhood.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(bad(format!("neighbourhood[{i}]"), "empty prompt"));
            }
        }
        for (kind, map) in [("locality", &self.locality), ("portability", &self.portability)] {
            for (key, items) in map {
                for (i, q) in items.iter().enumerate() {
                    if q.prompt.trim().is_empty() || q.answer.trim().is_empty() {
                        return Err(bad(format!("{kind}.{key}[{i}]"), "empty prompt or answer"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Token ids of `" " + answer` (the scored / trained form of a target).
///
/// # Errors
/// [`Error::Model`] (tokenizer errors).
pub(crate) fn answer_ids(tok: &amend_models::Tokenizer, answer: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(&format!(" {answer}"), false)?)
}

/// Validates every request, including that each target tokenises to at least one token.
///
/// # Errors
/// [`Error::InvalidInput`] for no requests; [`Error::InvalidEdit`] naming the request and field;
/// [`Error::Model`] (`NoTokenizer`).
pub fn validate_requests<M: CausalLm + ?Sized>(model: &M, requests: &[EditRequest]) -> Result<()> {
    if requests.is_empty() {
        return Err(Error::invalid("validate_requests", "requests", "no edit requests"));
    }
    let tok = model.tokenizer().ok_or(amend_models::Error::NoTokenizer { op: "edit" })?;
    for (i, r) in requests.iter().enumerate() {
        r.validate(i)?;
        let mut targets = vec![("target_new".to_string(), r.target_new.as_str())];
        if let Some(t) = &r.target_true {
            targets.push(("target_true".into(), t.as_str()));
        }
        for (field, t) in targets {
            if answer_ids(tok, t)?.is_empty() {
                return Err(Error::InvalidEdit {
                    index: i,
                    field,
                    reason: format!("target {t:?} tokenises to nothing"),
                });
            }
        }
        if tok.encode(&r.rewrite_prompt(), true)?.is_empty() {
            return Err(Error::InvalidEdit {
                index: i,
                field: "prompt".into(),
                reason: "prompt tokenises to nothing".into(),
            });
        }
    }
    Ok(())
}
