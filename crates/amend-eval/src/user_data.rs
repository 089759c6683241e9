//! User data for `amend compare --model DIR --data FILE.jsonl`: prompts, annotated responses and
//! the unwanted-word list, read from JSON Lines (schema in `docs/compare-data.md`).
//!
//! ```text
//! {"unwanted_words": ["darn", "heck"], "negative_prefix": "Answer rudely: "}       settings
//! {"prompt": "Describe your day.", "split": "train"}                                 a prompt
//! {"prompt": "Describe your day.", "response": " It was a heck of a day.",
//!  "unwanted_spans": [[12, 16]]}                                                     an annotation
//! {"prompt": "What is 2 + 2?", "split": "control"}                                   a control prompt
//! ```
//!
//! * Settings lines have no `prompt`: `unwanted_words` (the detector; it makes model samples
//!   annotatable and every metric that needs `p*` computable) and `negative_prefix` (NEAT's
//!   negative prompt). Each key may be given once.
//! * Item lines have a `prompt` and optionally a `response` (the continuation, scored without
//!   special tokens) with `unwanted_spans`: half-open `[start, end)` ranges in **characters**
//!   (Unicode scalar values, as Python string indices) of the response. Without spans, the
//!   unwanted words (if any) are found in the response; with neither, the response is clean.
//! * `split` is `train` (default: the prompt is sampled for training data, the response is
//!   training data), `eval` (held out: unwanted rate and `KL(p*‖p_new)` on the prompt,
//!   perplexity on a clean response, unwanted-token log-probability on an annotated one) or
//!   `control` (held out, responses are clean: `KL(p°‖p_new)` measures drift on the prompt).
//!
//! Unknown keys are errors (a typo would otherwise silently change the comparison).

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use crate::detector::UnwantedWords;
use crate::task::{AnnotatedResponse, Split, SuppressionTask};
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: Option<String>,
    response: Option<String>,
    unwanted_spans: Option<Vec<[usize; 2]>>,
    split: Option<String>,
    unwanted_words: Option<Vec<String>>,
    negative_prefix: Option<String>,
}

fn bad(path: &Path, line: usize, reason: impl Into<String>) -> Error {
    Error::Data { path: path.to_path_buf(), line, reason: reason.into() }
}

/// Byte range of the character range `[start, end)` of `text`, or `None` if out of bounds.
fn char_to_byte_range(text: &str, start: usize, end: usize) -> Option<std::ops::Range<usize>> {
    let mut idx: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    idx.push(text.len());
    if start >= end || end >= idx.len() {
        return None;
    }
    Some(idx[start]..idx[end])
}

/// Reads a comparison data file (see the [module docs](self)).
///
/// # Errors
/// [`Error::Io`]; [`Error::Data`] naming the line for malformed JSON, unknown keys, invalid
/// spans, an unknown split, repeated settings, or a file without prompts.
pub fn load_jsonl(path: &Path) -> Result<SuppressionTask> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let mut task = SuppressionTask {
        name: path.file_name().map_or_else(|| "user data".into(), |n| n.to_string_lossy().into()),
        ..SuppressionTask::default()
    };
    let mut words: Option<Vec<String>> = None;
    let mut pending = Vec::new();
    let (mut train, mut eval, mut control) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).map_err(|e| bad(path, n, e.to_string()))?;
        if let Some(w) = line.unwanted_words {
            if words.is_some() {
                return Err(bad(path, n, "`unwanted_words` given twice"));
            }
            words = Some(w);
        }
        if let Some(p) = line.negative_prefix {
            if task.negative_prefix.is_some() {
                return Err(bad(path, n, "`negative_prefix` given twice"));
            }
            task.negative_prefix = Some(p);
        }
        let Some(prompt) = line.prompt else {
            if line.response.is_some() || line.unwanted_spans.is_some() || line.split.is_some() {
                return Err(bad(
                    path,
                    n,
                    "`response`, `unwanted_spans` and `split` need a `prompt`",
                ));
            }
            continue;
        };
        if prompt.is_empty() {
            return Err(bad(path, n, "empty `prompt`"));
        }
        let split = match line.split.as_deref().unwrap_or("train") {
            "train" => Split::Train,
            "eval" => Split::Eval,
            "control" => {
                if line.response.is_some() {
                    return Err(bad(path, n, "control items are prompts only (no `response`)"));
                }
                control.insert(prompt);
                continue;
            }
            other => {
                return Err(bad(
                    path,
                    n,
                    format!("unknown split {other:?} (expected train, eval or control)"),
                ));
            }
        };
        match split {
            Split::Train => train.insert(prompt.clone()),
            Split::Eval => eval.insert(prompt.clone()),
        };
        match (line.response, line.unwanted_spans) {
            (Some(response), spans) => {
                let spans = match spans {
                    Some(s) => Some(
                        s.iter()
                            .map(|&[a, b]| {
                                char_to_byte_range(&response, a, b).ok_or_else(|| {
                                    bad(
                                        path,
                                        n,
                                        format!(
                                            "span [{a}, {b}] is empty or outside the response \
                                             ({} characters)",
                                            response.chars().count()
                                        ),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                };
                pending.push((n, prompt, response, spans, split));
            }
            (None, Some(_)) => return Err(bad(path, n, "`unwanted_spans` without `response`")),
            (None, None) => {}
        }
    }
    task.detector = words.map(UnwantedWords::new).transpose()?;
    for (_, prompt, response, spans, split) in pending {
        let unwanted_spans = match (spans, &task.detector) {
            (Some(s), _) => s,
            (None, Some(d)) => d.spans(&response),
            (None, None) => vec![],
        };
        task.responses.push(AnnotatedResponse { prompt, response, unwanted_spans, split });
    }
    if train.is_empty() && task.responses.iter().all(|r| r.split != Split::Train) {
        return Err(bad(path, 0, "no training prompt or response"));
    }
    for p in &eval {
        if train.contains(p) {
            return Err(bad(path, 0, format!("prompt {p:?} is both train and eval")));
        }
    }
    task.train_prompts = train.into_iter().collect();
    task.eval_prompts = eval.into_iter().collect();
    task.control_prompts = control.into_iter().collect();
    Ok(task)
}

/// Tokenises an annotated response: `(prompt ids with special tokens, response ids + EOS,
/// weights)`; weights are −1 on tokens overlapping an unwanted span and +1 elsewhere.
///
/// # Errors
/// [`Error::Model`] for tokenizer errors.
pub fn encode_annotated(
    tok: &amend_models::Tokenizer,
    r: &AnnotatedResponse,
) -> Result<(Vec<u32>, Vec<u32>, Vec<i8>)> {
    let prompt_ids = tok.encode(&r.prompt, true)?;
    let enc = tok.inner().encode(r.response.as_str(), false).map_err(|source| {
        Error::Model(amend_models::Error::Tokenizer { path: tok.path().map(Into::into), source })
    })?;
    let mut ids = enc.get_ids().to_vec();
    let mut weights = crate::annotate::weights_from_spans(enc.get_offsets(), &r.unwanted_spans);
    if let Some(&eos) = tok.eos_token_ids().first() {
        ids.push(eos);
        weights.push(1);
    }
    Ok((prompt_ids, ids, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_ranges() {
        assert_eq!(char_to_byte_range("aéb", 1, 2), Some(1..3));
        assert_eq!(char_to_byte_range("aéb", 0, 3), Some(0..4));
        assert_eq!(char_to_byte_range("aéb", 2, 4), None);
        assert_eq!(char_to_byte_range("aéb", 2, 2), None);
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    fn parse(text: &str) -> Result<SuppressionTask> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        load_jsonl(&path)
    }

    #[test]
    fn the_documented_example_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/compare/example-data.jsonl");
        let t = load_jsonl(&path).unwrap();
        assert_eq!(t.detector.as_ref().unwrap().words(), ["darn", "heck"]);
        assert_eq!(t.negative_prefix.as_deref(), Some("Rudely: "));
        assert_eq!(t.train_prompts, ["Describe rain.", "Greet me.", "Name a color."]);
        assert_eq!(t.eval_prompts, ["Name a fruit.", "Name a tool.", "Name a tree."]);
        assert_eq!(t.control_prompts, ["Count to three.", "Spell cat."]);
        assert_eq!(t.responses.len(), 8);
        // Explicit character spans and spans found by the word list.
        assert_eq!(t.responses[0].unwanted_spans, vec![8..12]);
        assert_eq!(t.responses[2].unwanted_spans, vec![1..5]);
        assert!(!t.responses[3].is_unwanted());
        let eval: Vec<_> = t.responses.iter().filter(|r| r.split == Split::Eval).collect();
        assert_eq!(eval.len(), 2);
        assert_eq!(&eval[1].response[eval[1].unwanted_spans[0].clone()], "heck");
    }

    #[test]
    fn character_spans_become_byte_ranges() {
        let t =
            parse(r#"{"prompt": "p", "response": "é darn", "unwanted_spans": [[2, 6]]}"#).unwrap();
        let r = &t.responses[0];
        assert_eq!(&r.response[r.unwanted_spans[0].clone()], "darn");
    }

    #[test]
    fn malformed_files_name_the_line() {
        let cases = [
            ("{\"prompt\": \"a\", \"respnse\": \"x\"}", 1, "unknown field"),
            (
                "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"response\": \"xy\", \"unwanted_spans\": [[1, 5]]}",
                2,
                "outside",
            ),
            (
                "{\"unwanted_words\": [\"a\"]}\n{\"unwanted_words\": [\"b\"]}\n{\"prompt\": \"a\"}",
                2,
                "twice",
            ),
            ("{\"prompt\": \"a\", \"split\": \"control\", \"response\": \"x\"}", 1, "control"),
            ("{\"prompt\": \"a\", \"split\": \"test\"}", 1, "unknown split"),
            ("{\"prompt\": \"a\", \"unwanted_spans\": [[0, 1]]}", 1, "without `response`"),
            ("{\"response\": \"x\"}", 1, "need a `prompt`"),
            ("not json", 1, "expected"),
            ("{\"prompt\": \"a\", \"split\": \"eval\"}", 0, "no training"),
            (
                "{\"prompt\": \"a\"}\n{\"prompt\": \"a\", \"split\": \"eval\"}",
                0,
                "both train and eval",
            ),
        ];
        for (text, line, needle) in cases {
            match parse(text) {
                Err(Error::Data { line: l, reason, .. }) => {
                    assert_eq!(l, line, "{text}: {reason}");
                    assert!(reason.contains(needle), "{text}: {reason}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse("{\"unwanted_words\": [\"two words\"]}\n{\"prompt\": \"a\"}"),
            Err(Error::InvalidInput { .. })
        ));
    }
}
