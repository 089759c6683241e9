//! Tokenizers: a thin wrapper over the `tokenizers` crate that knows the model's special tokens,
//! plus batching helpers (padding, attention masks).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// A `tokenizer.json` tokenizer together with the model's special token ids.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
    path: Option<PathBuf>,
    out_of_vocab: Vec<OutOfVocabId>,
}

/// A special-token id from a model's config files that has no row in its vocabulary.
///
/// transformers loads such a model (a GPT-2 saved with a small vocabulary keeps `GPT2Config`'s
/// default `bos_token_id = eos_token_id = 50256`), and so does amend: the loader warns, leaves the
/// id out of the tokenizer's special tokens (an end-of-sequence id outside the vocabulary can
/// never be generated, so dropping it changes nothing), and fails with
/// [`Error::SpecialTokenOutOfVocab`] only where the id would be used (prepending a BOS token,
/// generating from an empty prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfVocabId {
    /// The file that sets it (`config.json` or `generation_config.json`).
    pub file: PathBuf,
    /// The field (`bos_token_id`, `eos_token_id` or `pad_token_id`).
    pub field: &'static str,
    /// The id.
    pub id: u32,
    /// Rows of the model's embedding matrix.
    pub model_vocab: usize,
}

impl OutOfVocabId {
    /// The error for using this id in `op`.
    pub fn error(&self, op: &'static str) -> Error {
        Error::SpecialTokenOutOfVocab {
            op,
            path: self.file.clone(),
            field: self.field,
            id: self.id,
            model_vocab: self.model_vocab,
        }
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` file. Special tokens are unset; the model loader fills them from
    /// `config.json` and `generation_config.json`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] naming the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|source| Error::Tokenizer { path: Some(path.to_path_buf()), source })?;
        Ok(Tokenizer {
            inner,
            bos: None,
            eos: vec![],
            pad: None,
            path: Some(path.to_path_buf()),
            out_of_vocab: vec![],
        })
    }

    /// Wraps a tokenizer built in code.
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner, bos: None, eos: vec![], pad: None, path: None, out_of_vocab: vec![] }
    }

    /// Sets the special token ids.
    pub fn with_special_tokens(
        mut self,
        bos: Option<u32>,
        eos: Vec<u32>,
        pad: Option<u32>,
    ) -> Self {
        self.bos = bos;
        self.eos = eos;
        self.pad = pad;
        self
    }

    /// Records special-token ids of the config files that the loader left out because the
    /// model's vocabulary has no row for them (see [`OutOfVocabId`]).
    pub fn with_out_of_vocab_ids(mut self, ids: Vec<OutOfVocabId>) -> Self {
        self.out_of_vocab = ids;
        self
    }

    /// Special-token ids of the config files that are outside the model's vocabulary and were
    /// left out (empty for a consistent checkpoint).
    pub fn out_of_vocab_ids(&self) -> &[OutOfVocabId] {
        &self.out_of_vocab
    }

    /// The BOS id to prepend: `bos_token_id`, else the first end-of-sequence id (GPT-2's
    /// convention), else `None`.
    ///
    /// # Errors
    /// [`Error::SpecialTokenOutOfVocab`] when there is no usable id because the config's
    /// `bos_token_id` (or `eos_token_id`) is outside the vocabulary, naming the file and field.
    pub fn bos_for(&self, op: &'static str) -> Result<Option<u32>> {
        if let Some(b) = self.bos.or_else(|| self.eos.first().copied()) {
            return Ok(Some(b));
        }
        let bad = self
            .out_of_vocab
            .iter()
            .find(|o| o.field == "bos_token_id")
            .or_else(|| self.out_of_vocab.iter().find(|o| o.field == "eos_token_id"));
        match bad {
            Some(o) => Err(o.error(op)),
            None => Ok(None),
        }
    }

    /// The wrapped `tokenizers` tokenizer, for everything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The file it was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence ids (generation stops on any of them by default).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Padding id: `pad_token_id`, else the first end-of-sequence id, else 0 (padding positions
    /// are always masked, so the value only has to be a valid id).
    pub fn pad_token_id(&self) -> u32 {
        self.pad.or_else(|| self.eos.first().copied()).unwrap_or(0)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce.
    pub fn max_token_id(&self) -> Option<u32> {
        self.inner.get_vocab(true).into_values().max()
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS token).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|source| Error::Tokenizer { path: self.path.clone(), source })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, optionally without special tokens.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|source| Error::Tokenizer { path: self.path.clone(), source })
    }

    /// The string of one token id (`None` for ids outside the vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of one token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The `tokenizer.json` text.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|source| Error::Tokenizer { path: self.path.clone(), source })
    }

    /// Errors unless every id the tokenizer can produce is a row of a `model_vocab`-row embedding.
    pub(crate) fn check_fits(&self, model_vocab: usize, path: &Path) -> Result<()> {
        if let Some(max_id) = self.max_token_id()
            && max_id as usize >= model_vocab
        {
            return Err(Error::TokenizerVocab {
                path: path.to_path_buf(),
                tokenizer_vocab: self.vocab_size(),
                max_id,
                model_vocab,
            });
        }
        // Special ids are checked by the loader, which names the config file they come from.
        debug_assert!(
            self.bos
                .iter()
                .chain(&self.eos)
                .chain(&self.pad)
                .all(|&id| (id as usize) < model_vocab)
        );
        Ok(())
    }
}

/// Which side of a batch row receives the padding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    /// Pad after the tokens (training, scoring).
    #[default]
    Right,
    /// Pad before the tokens (generation: every row ends at the last column).
    Left,
}

/// A padded batch of token ids.
#[derive(Debug)]
pub struct Batch {
    /// Token ids, `[b_sz, seq_len]` (i64); padding positions hold the pad id.
    pub input_ids: Tensor,
    /// 1 for tokens, 0 for padding, `[b_sz, seq_len]` (i64).
    pub attention_mask: Tensor,
    /// Number of real tokens per row.
    pub lengths: Vec<usize>,
    /// Which side was padded.
    pub side: PaddingSide,
}

/// Pads token sequences into a batch.
///
/// # Shapes
/// `input_ids`, `attention_mask`: `[seqs.len(), max_len]` with `max_len` the longest sequence.
///
/// # Errors
/// [`Error::InvalidInput`] for an empty list or an empty sequence; [`Error::Tch`].
///
/// ```
/// use amend_models::tokenizer::{pad_batch, PaddingSide};
/// let b = pad_batch(&[vec![5, 6, 7], vec![8]], 0, PaddingSide::Left, tch::Device::Cpu)?;
/// assert_eq!(Vec::<i64>::try_from(b.input_ids.flatten(0, -1))?, vec![5, 6, 7, 0, 0, 8]);
/// assert_eq!(Vec::<i64>::try_from(b.attention_mask.flatten(0, -1))?, vec![1, 1, 1, 0, 0, 1]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pad_batch(
    seqs: &[Vec<u32>],
    pad_id: u32,
    side: PaddingSide,
    device: Device,
) -> Result<Batch> {
    if seqs.is_empty() {
        return Err(Error::invalid("pad_batch", "seqs", "no sequences"));
    }
    if let Some(i) = seqs.iter().position(Vec::is_empty) {
        return Err(Error::invalid("pad_batch", "seqs", format!("sequence {i} is empty")));
    }
    let max_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * max_len);
    let mut mask = Vec::with_capacity(seqs.len() * max_len);
    for s in seqs {
        let pad = max_len - s.len();
        let toks = s.iter().map(|&t| i64::from(t));
        let pads = std::iter::repeat_n(i64::from(pad_id), pad);
        match side {
            PaddingSide::Right => {
                ids.extend(toks.chain(pads));
                mask.extend(std::iter::repeat_n(1i64, s.len()).chain(std::iter::repeat_n(0, pad)));
            }
            PaddingSide::Left => {
                ids.extend(pads.chain(toks));
                mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, s.len())));
            }
        }
    }
    let shape = [seqs.len() as i64, max_len as i64];
    let input_ids = Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(device)?;
    let attention_mask = Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(device)?;
    debug_assert_eq!(input_ids.kind(), Kind::Int64);
    Ok(Batch { input_ids, attention_mask, lengths: seqs.iter().map(Vec::len).collect(), side })
}
