//! Tokenizing texts and sentence pairs for BERT, and padding them into batches.
//!
//! Pairs become `[CLS] A [SEP] B [SEP]` with token types 0 for A and 1 for B, through the
//! model's own `tokenizer.json` (the tokenizers crate, the same core as transformers' fast
//! tokenizers). Padding and truncation baked into that file (all-MiniLM-L6-v2's pads and
//! truncates everything to 128) are cleared: this module truncates to the model's limit with the
//! chosen strategy, and pads each batch only to its longest member.

use std::path::Path;
use std::str::FromStr;

use candle_core::{Device, Tensor};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// Which text loses tokens when a pair is too long (transformers' `truncation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Remove from the longer text, one token at a time (transformers' default for pairs).
    #[default]
    LongestFirst,
    /// Remove only from the first text.
    OnlyFirst,
    /// Remove only from the second text.
    OnlySecond,
}

impl FromStr for Truncation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "longest_first" => Ok(Self::LongestFirst),
            "only_first" => Ok(Self::OnlyFirst),
            "only_second" => Ok(Self::OnlySecond),
            other => Err(Error::Tokenize(format!(
                "unknown truncation {other:?}; expected longest_first, only_first or only_second"
            ))),
        }
    }
}

impl Truncation {
    fn strategy(self) -> TruncationStrategy {
        match self {
            Self::LongestFirst => TruncationStrategy::LongestFirst,
            Self::OnlyFirst => TruncationStrategy::OnlyFirst,
            Self::OnlySecond => TruncationStrategy::OnlySecond,
        }
    }
}

/// How texts are fitted to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// Longest sequence in tokens, special tokens included (the model's position limit).
    pub max_length: usize,
    /// Which text of a pair is shortened.
    pub truncation: Truncation,
    /// Refuse over-long input with an error instead of truncating it.
    pub error_on_overflow: bool,
}

impl TokenizeOptions {
    /// Truncate with `longest_first` to `max_length` tokens.
    pub fn new(max_length: usize) -> Self {
        Self {
            max_length,
            truncation: Truncation::default(),
            error_on_overflow: false,
        }
    }
}

/// One tokenized text or pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids, special tokens included.
    pub ids: Vec<u32>,
    /// 0 for the first text (and `[CLS]`), 1 for the second.
    pub type_ids: Vec<u32>,
    /// Whether tokens were cut to fit.
    pub truncated: bool,
}

impl Encoded {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens at all (never true for BERT's template).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A BERT tokenizer configured for this library: no baked-in padding, our truncation.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: tokenizers::Tokenizer,
    options: TokenizeOptions,
    pad_id: u32,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("options", &self.options)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl BertTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, options: TokenizeOptions) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::Tokenize(format!("cannot load tokenizer {}: {e}", path.display()))
        })?;
        Self::new(inner, options)
    }

    /// Wraps a tokenizer, replacing its padding and truncation settings.
    pub fn new(mut inner: tokenizers::Tokenizer, options: TokenizeOptions) -> Result<Self> {
        if options.max_length < 3 {
            return Err(Error::Tokenize(format!(
                "max_length {} leaves no room for [CLS] and [SEP]",
                options.max_length
            )));
        }
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: options.max_length,
                strategy: options.truncation.strategy(),
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(Self {
            inner,
            options,
            pad_id,
        })
    }

    /// The settings in force.
    pub fn options(&self) -> TokenizeOptions {
        self.options
    }

    /// The id padding uses.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying tokenizers-crate tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn finish(&self, what: impl Fn() -> String, encoding: tokenizers::Encoding) -> Result<Encoded> {
        let truncated = !encoding.get_overflowing().is_empty();
        if truncated && self.options.error_on_overflow {
            let full: usize = encoding.len()
                + encoding
                    .get_overflowing()
                    .iter()
                    .map(|o| o.len())
                    .sum::<usize>();
            return Err(Error::Tokenize(format!(
                "{} is {full} tokens or more, longer than the limit of {}; shorten it or allow \
                 truncation",
                what(),
                self.options.max_length
            )));
        }
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
            truncated,
        })
    }

    /// `[CLS] text [SEP]` for each text.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let encoding = self
                    .inner
                    .encode(*text, true)
                    .map_err(|e| Error::Tokenize(format!("text {i}: {e}")))?;
                self.finish(|| format!("text {i}"), encoding)
            })
            .collect()
    }

    /// `[CLS] a [SEP] b [SEP]` for each pair, types 0 then 1.
    pub fn encode_pairs(&self, pairs: &[(&str, &str)]) -> Result<Vec<Encoded>> {
        pairs
            .iter()
            .enumerate()
            .map(|(i, (a, b))| {
                let encoding = self.inner.encode((*a, *b), true).map_err(|e| {
                    Error::Tokenize(format!(
                        "pair {i}: {e} (truncation {:?} cannot bring it to {} tokens)",
                        self.options.truncation, self.options.max_length
                    ))
                })?;
                self.finish(|| format!("pair {i}"), encoding)
            })
            .collect()
    }
}

/// A padded batch ready for the model.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[batch, seq]` u32 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]` u32, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` u32 segment ids.
    pub token_type_ids: Tensor,
}

impl PaddedBatch {
    /// The batch as model inputs.
    pub fn inputs(&self) -> bert_heads::BertInputs<'_> {
        bert_heads::BertInputs::new(&self.input_ids)
            .with_attention_mask(&self.attention_mask)
            .with_token_type_ids(&self.token_type_ids)
    }
}

impl BertTokenizer {
    /// Tokenizes `pairs` and pads them into one batch on `device`.
    pub fn pair_batch(&self, pairs: &[(&str, &str)], device: &Device) -> Result<PaddedBatch> {
        let encoded = self.encode_pairs(pairs)?;
        let refs: Vec<&Encoded> = encoded.iter().collect();
        pad_batch(&refs, self.pad_id, device)
    }
}

/// Pads `items` to the longest of them (dynamic padding) on `device`.
pub fn pad_batch(items: &[&Encoded], pad_id: u32, device: &Device) -> Result<PaddedBatch> {
    let seq = items.iter().map(|e| e.len()).max().unwrap_or(0);
    let batch = items.len();
    let mut ids = Vec::with_capacity(batch * seq);
    let mut mask = Vec::with_capacity(batch * seq);
    let mut types = Vec::with_capacity(batch * seq);
    for item in items {
        let pad = seq - item.len();
        ids.extend(
            item.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad_id, pad)),
        );
        mask.extend(std::iter::repeat_n(1u32, item.len()).chain(std::iter::repeat_n(0, pad)));
        types.extend(
            item.type_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    let tensor = |v: Vec<u32>| Tensor::from_vec(v, (batch, seq), device);
    Ok(PaddedBatch {
        input_ids: tensor(ids)?,
        attention_mask: tensor(mask)?,
        token_type_ids: tensor(types)?,
    })
}

/// Splits item indices into batches: sorted by length (so each batch pads little) and capped
/// at `max_tokens` padded tokens per batch (at least one item each). Returned in sorted order;
/// callers put results back by index.
pub fn length_buckets(lengths: &[usize], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let candidate_longest = longest.max(lengths[i]);
        if !current.is_empty() && candidate_longest * (current.len() + 1) > max_tokens {
            batches.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(lengths[i]);
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_item_once_within_the_cap() {
        let lengths = [5, 100, 7, 30, 30, 2, 64, 9];
        let batches = length_buckets(&lengths, 128);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in &batches {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(
                batch.len() == 1 || longest * batch.len() <= 128,
                "{batch:?}"
            );
        }
        // An item longer than the cap still gets a batch of its own.
        assert_eq!(length_buckets(&[500, 3], 128), vec![vec![0], vec![1]]);
        assert!(length_buckets(&[], 128).is_empty());
    }

    #[test]
    fn padding_is_dynamic() {
        let a = Encoded {
            ids: vec![101, 7, 102],
            type_ids: vec![0, 0, 0],
            truncated: false,
        };
        let b = Encoded {
            ids: vec![101, 102],
            type_ids: vec![0, 0],
            truncated: false,
        };
        let batch = pad_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![101, 7, 102], vec![101, 102, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
    }

    #[test]
    fn truncation_names_parse() {
        assert_eq!(
            "only-second".parse::<Truncation>().unwrap(),
            Truncation::OnlySecond
        );
        assert!("middle".parse::<Truncation>().is_err());
    }
}
