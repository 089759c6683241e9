//! [`UnwantedWords`]: the detector that decides whether a text belongs to the unwanted set `U`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A list of unwanted words and the rule that finds them in text.
///
/// A response is *unwanted* (`y ∈ U`) when its text contains one of the words as a whole word:
/// case-insensitively, as a maximal run of alphanumeric characters (so `blorp` matches
/// `"Blorp!"` and `"the blorp fox"` but not `"blorpy"` or `"xblorp"`). The definition is on
/// text, not on tokens: a model that spells a word with unusual tokens still produces it.
///
/// ```
/// use amend_eval::UnwantedWords;
/// let u = UnwantedWords::new(["blorp", "zonk"])?;
/// assert!(u.is_unwanted("the Blorp fox sleeps."));
/// assert!(!u.is_unwanted("the blorpy fox sleeps."));
/// assert_eq!(u.spans("zonk! the blorp fox"), vec![0..4, 10..15]);
/// # Ok::<(), amend_eval::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnwantedWords {
    words: Vec<String>,
}

impl UnwantedWords {
    /// A detector for `words` (stored lower-cased).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty list or a word that is empty or contains a
    /// non-alphanumeric character (it could never match a whole word).
    pub fn new<I, S>(words: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out: Vec<String> = Vec::new();
        for w in words {
            let w = w.as_ref().trim().to_lowercase();
            if w.is_empty() || !w.chars().all(char::is_alphanumeric) {
                return Err(Error::InvalidInput {
                    op: "UnwantedWords::new",
                    name: "words".into(),
                    reason: format!(
                        "{w:?}: an unwanted word must be a non-empty run of letters or digits"
                    ),
                });
            }
            if !out.contains(&w) {
                out.push(w);
            }
        }
        if out.is_empty() {
            return Err(Error::InvalidInput {
                op: "UnwantedWords::new",
                name: "words".into(),
                reason: "no unwanted word".into(),
            });
        }
        Ok(UnwantedWords { words: out })
    }

    /// The words, lower-cased, in the order given.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// Byte ranges of the unwanted words found in `text`, in order.
    pub fn spans(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
            match (c.is_alphanumeric(), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    let word = &text[s..i];
                    if self.words.iter().any(|w| w.as_str() == word.to_lowercase()) {
                        out.push(s..i);
                    }
                    start = None;
                }
                _ => {}
            }
        }
        out
    }

    /// Whether `text` contains an unwanted word.
    pub fn is_unwanted(&self, text: &str) -> bool {
        !self.spans(text).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_whole_words_case_insensitive() {
        let u = UnwantedWords::new(["blorp"]).unwrap();
        assert_eq!(u.spans("Blorp, blorp! xblorp blorpy blorp"), vec![0..5, 7..12, 28..33]);
        assert!(u.spans("").is_empty());
        assert_eq!(u.spans("é blorp é"), vec![3..8]);
    }

    #[test]
    fn invalid_words_are_rejected() {
        assert!(UnwantedWords::new(Vec::<String>::new()).is_err());
        assert!(UnwantedWords::new(["two words"]).is_err());
        assert!(UnwantedWords::new([""]).is_err());
        assert_eq!(UnwantedWords::new(["A", "a"]).unwrap().words(), ["a"]);
    }
}
