//! What users came for: score how similar two texts are ([`PairScorer`]) and embed texts
//! ([`Embedder`]).
//!
//! Both tokenize with the model's own tokenizer, sort inputs by length into batches capped in
//! padded tokens (so little padding is computed), run them, and return results in input order.
//! Both are `Send + Sync`: one loaded model can serve many threads.

use candle_core::{DType, Device, Tensor, D};

use bert_embeddings::Config;
use bert_heads::{BertForSequenceClassification, BertInputs, BertModel};

use bert_encoder::ForwardOptions;

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::limits::MAX_TOKENS_PER_BATCH;
use crate::load::{load, ModelFiles};
use crate::source::ModelSource;
use crate::tokenize::{
    length_buckets, pad_batch, BertTokenizer, Encoded, TokenizeOptions, Truncation,
};

/// How a sentence pair is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreMode {
    /// One pass over `[CLS] A [SEP] B [SEP]`: pooler -> classifier -> sigmoid, a probability in
    /// [0, 1]. Needs a checkpoint with a trained one-label classification head.
    CrossEncoder,
    /// Cosine of the two texts' mean-pooled embeddings, in [-1, 1]: what sentence-embedding
    /// models such as all-MiniLM-L6-v2 were trained for.
    BiEncoder,
}

impl ScoreMode {
    /// A one-line description for users.
    pub fn describe(self) -> &'static str {
        match self {
            Self::CrossEncoder => {
                "cross-encoder (pooled [CLS] -> classifier -> sigmoid probability)"
            }
            Self::BiEncoder => "bi-encoder (cosine of mean-pooled embeddings)",
        }
    }
}

impl std::str::FromStr for ScoreMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cross" | "cross-encoder" => Ok(Self::CrossEncoder),
            "bi" | "bi-encoder" => Ok(Self::BiEncoder),
            other => Err(Error::InvalidOption(format!(
                "score mode {other:?}; expected cross or bi"
            ))),
        }
    }
}

/// How token states become one vector per text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Average of the real tokens' last hidden states (sentence-transformers' default).
    #[default]
    Mean,
    /// The `[CLS]` token's last hidden state.
    Cls,
}

impl std::str::FromStr for Pooling {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            other => Err(Error::InvalidOption(format!(
                "pooling {other:?}; expected mean or cls"
            ))),
        }
    }
}

/// Where and how a pipeline runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOptions {
    /// Device to run on.
    pub device: DeviceSpec,
    /// Compute dtype (weights are converted at load).
    pub dtype: DType,
    /// Token limit per sequence; `None` means the model's `max_position_embeddings`.
    pub max_length: Option<usize>,
    /// Which text of a pair is shortened when too long.
    pub truncation: Truncation,
    /// Refuse over-long input instead of truncating.
    pub error_on_overflow: bool,
    /// Cap on padded tokens (batch size x longest sequence) per forward pass (at most
    /// [`MAX_TOKENS_PER_BATCH`]).
    pub max_tokens_per_batch: usize,
    /// Encode empty and whitespace-only texts as transformers does (`[CLS] [SEP]`) instead of
    /// refusing them with [`Error::Input`] (off by default: an empty text is usually a data bug).
    pub allow_empty_texts: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Auto,
            dtype: DType::F32,
            max_length: None,
            truncation: Truncation::LongestFirst,
            error_on_overflow: false,
            max_tokens_per_batch: 8192,
            allow_empty_texts: false,
        }
    }
}

/// What every pipeline needs besides its model.
#[derive(Debug, Clone)]
struct Runner {
    tokenizer: BertTokenizer,
    device: Device,
    max_tokens_per_batch: usize,
    allow_empty_texts: bool,
}

impl Runner {
    fn new(files: &ModelFiles, config: &Config, options: &PipelineOptions) -> Result<Self> {
        let max_positions = config.max_position_embeddings;
        let path = files.tokenizer.as_ref().ok_or_else(|| {
            Error::checkpoint(&files.dir, "no tokenizer.json: text cannot be tokenized")
        })?;
        if options.max_tokens_per_batch > MAX_TOKENS_PER_BATCH {
            return Err(Error::InvalidOption(format!(
                "max_tokens_per_batch {} is over the bound of {MAX_TOKENS_PER_BATCH} \
                 (bert::limits::MAX_TOKENS_PER_BATCH)",
                options.max_tokens_per_batch
            )));
        }
        let max_length = options.max_length.unwrap_or(max_positions);
        if max_length > max_positions {
            return Err(Error::Tokenize(format!(
                "max_length {max_length} exceeds the model's {max_positions} positions"
            )));
        }
        let tokenize = TokenizeOptions {
            max_length,
            truncation: options.truncation,
            error_on_overflow: options.error_on_overflow,
        };
        let tokenizer = BertTokenizer::from_file(path, tokenize)?;
        // A tokenizer from another model would hand out ids the embedding table lacks; say so
        // at load instead of failing on the first text that uses one.
        let vocab = tokenizer.inner().get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(Error::checkpoint(
                path,
                format!(
                    "the tokenizer has {vocab} tokens but the model's vocab_size is {}: \
                     tokenizer and weights are from different models",
                    config.vocab_size
                ),
            ));
        }
        Ok(Self {
            tokenizer,
            device: options.device.open()?,
            max_tokens_per_batch: options.max_tokens_per_batch.max(1),
            allow_empty_texts: options.allow_empty_texts,
        })
    }

    /// Refuses a text [`crate::limits::text_problem`] objects to, naming it by `item`.
    fn check_text(&self, item: impl FnOnce() -> String, text: &str) -> Result<()> {
        match crate::limits::text_problem(text, self.allow_empty_texts) {
            Some(reason) => Err(Error::Input {
                item: item(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Runs `forward` over length-sorted batches of `encoded`; returns one row per input, in
    /// input order.
    fn run<T: Clone>(
        &self,
        encoded: &[Encoded],
        forward: impl Fn(&BertInputs) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let lengths: Vec<usize> = encoded.iter().map(Encoded::len).collect();
        let mut results: Vec<Option<T>> = vec![None; encoded.len()];
        for batch in length_buckets(&lengths, self.max_tokens_per_batch) {
            let items: Vec<&Encoded> = batch.iter().map(|&i| &encoded[i]).collect();
            let padded = pad_batch(&items, self.tokenizer.pad_id(), &self.device)?;
            let inputs = padded.inputs();
            let rows = forward(&inputs).map_err(|e| {
                let (sequences, longest) = inputs.input_ids.dims2().unwrap_or_default();
                explain_out_of_memory(e, sequences, longest, self.max_tokens_per_batch)
            })?;
            for (i, row) in batch.iter().zip(rows) {
                results[*i] = Some(row);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every index is in one batch"))
            .collect())
    }
}

/// Turns texts into vectors.
#[derive(Debug, Clone)]
pub struct Embedder {
    model: BertModel,
    runner: Runner,
    pooling: Pooling,
    normalize: bool,
}

impl Embedder {
    /// Fetches (if needed) and loads a model for embedding: mean pooling, not normalised.
    ///
    /// ```
    /// use bert::{Embedder, ModelSource, PipelineOptions};
    /// # fn main() -> bert::Result<()> {
    /// let embedder = Embedder::load(&"all-MiniLM-L6-v2".parse::<ModelSource>()?, &PipelineOptions::default())?
    ///     .with_normalize(true);
    /// let vectors = embedder.embed(&["A man is playing a guitar.", "Someone plays an instrument."])?;
    /// assert_eq!(vectors[0].len(), 384);
    /// assert!(bert::cosine_similarity(&vectors[0], &vectors[1]) > 0.5);
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(source: &ModelSource, options: &PipelineOptions) -> Result<Self> {
        Self::from_files(&source.fetch()?, options)
    }

    /// Loads from local files.
    pub fn from_files(files: &ModelFiles, options: &PipelineOptions) -> Result<Self> {
        let config = files.read_config()?;
        let runner = Runner::new(files, &config, options)?;
        let model = load::<BertModel>(files, options.dtype, &runner.device)?.model;
        Ok(Self {
            model,
            runner,
            pooling: Pooling::Mean,
            normalize: false,
        })
    }

    /// Chooses the pooling.
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Scales every vector to unit length.
    pub fn with_normalize(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &BertTokenizer {
        &self.runner.tokenizer
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.runner.device
    }

    /// One vector per text, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        for (i, text) in texts.iter().enumerate() {
            self.runner.check_text(|| format!("text {i}"), text)?;
        }
        self.embed_checked(texts)
    }

    /// [`Self::embed`] for texts the caller has already checked (and named in its own terms).
    fn embed_checked(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encoded = self.runner.tokenizer.encode_texts(texts)?;
        // Padding-free: pooling reads the real tokens only.
        let options = ForwardOptions::inference().with_skip_padding();
        self.runner.run(&encoded, |inputs| {
            let hidden = self.model.forward(inputs, &options)?.last_hidden_state;
            let mask = inputs
                .attention_mask
                .expect("the runner always sets a mask");
            let pooled = pool(&hidden, mask, self.pooling)?;
            let pooled = if self.normalize {
                l2_normalize(&pooled)?
            } else {
                pooled
            };
            Ok(pooled.to_vec2::<f32>()?)
        })
    }
}

/// A device allocation failure becomes an [`Error::Device`] that says which batch did not fit
/// and what to lower; any other error passes through.
fn explain_out_of_memory(
    error: Error,
    sequences: usize,
    longest: usize,
    max_tokens_per_batch: usize,
) -> Error {
    let text = error.to_string();
    // cudarc's `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`, and the allocators'
    // plain "out of memory".
    if text.contains("CUDA_ERROR_OUT_OF_MEMORY")
        || text.to_ascii_lowercase().contains("out of memory")
    {
        Error::Device(format!(
            "out of memory running a batch of {sequences} x {longest} tokens ({text}); lower \
             max_tokens_per_batch (now {max_tokens_per_batch}) or max_length, or use a smaller dtype"
        ))
    } else {
        error
    }
}

/// `[batch, seq, hidden]` -> `[batch, hidden]` f32.
fn pool(hidden: &Tensor, attention_mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let hidden = hidden.to_dtype(DType::F32)?;
    Ok(match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => {
            let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            summed.broadcast_div(&counts)?
        }
    })
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norms = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norms)?)
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        (dot / denominator) as f32
    }
}

/// The distinct texts of `texts` in first-seen order, and for each text its index among them:
/// a bi-encoder embeds a text shared by many pairs (one document against many, a query against
/// candidates) once.
fn unique_texts<'a>(texts: impl Iterator<Item = &'a str>) -> (Vec<&'a str>, Vec<usize>) {
    let mut unique = Vec::new();
    let mut seen = std::collections::HashMap::new();
    let slots = texts
        .map(|text| {
            *seen.entry(text).or_insert_with(|| {
                unique.push(text);
                unique.len() - 1
            })
        })
        .collect();
    (unique, slots)
}

/// A document's place in a ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Index of the document in the input.
    pub index: usize,
    /// Its score against the query.
    pub score: f32,
}

/// The model pair scoring uses when none is named: the bundled cross-encoder
/// ([`DEFAULT_SCORER`](crate::DEFAULT_SCORER)), except that bi-encoder scoring uses the base
/// model its cosine is meaningful for ([`DEFAULT_MODEL`](crate::DEFAULT_MODEL)), not the
/// cross-encoder's fine-tuned encoder.
pub fn default_scorer_model(mode: Option<ScoreMode>) -> &'static str {
    match mode {
        Some(ScoreMode::BiEncoder) => crate::manifest::DEFAULT_MODEL,
        Some(ScoreMode::CrossEncoder) | None => crate::manifest::DEFAULT_SCORER,
    }
}

#[derive(Debug, Clone)]
enum Scorer {
    Cross {
        model: BertForSequenceClassification,
        runner: Runner,
    },
    Bi(Embedder),
}

/// Scores sentence pairs: a cross-encoder's probability when the checkpoint has a trained
/// one-label head, the cosine of mean-pooled embeddings otherwise.
#[derive(Debug, Clone)]
pub struct PairScorer {
    scorer: Scorer,
}

impl PairScorer {
    /// Fetches (if needed) and loads a model. `mode: None` picks the cross-encoder when the
    /// checkpoint is a one-label `BertForSequenceClassification` and the bi-encoder otherwise.
    ///
    /// ```
    /// use bert::{ModelSource, PairScorer, PipelineOptions, ScoreMode};
    /// # fn main() -> bert::Result<()> {
    /// let scorer = PairScorer::load(&"all-MiniLM-L6-v2".parse::<ModelSource>()?, &PipelineOptions::default(), None)?;
    /// assert_eq!(scorer.mode(), ScoreMode::BiEncoder); // the default base model has no trained head
    /// let scores = scorer.score(&[
    ///     ("A man is playing a guitar.", "Someone is playing an instrument."),
    ///     ("A man is playing a guitar.", "A woman is slicing an onion."),
    /// ])?;
    /// assert!(scores[0] > scores[1]);
    /// let ranking = scorer.rank("What instrument?", &["A cat sleeps.", "He plays the violin."])?;
    /// assert_eq!(ranking[0].index, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(
        source: &ModelSource,
        options: &PipelineOptions,
        mode: Option<ScoreMode>,
    ) -> Result<Self> {
        Self::from_files(&source.fetch()?, options, mode)
    }

    /// Loads the default model for `mode` ([`default_scorer_model`]): with `None`, the bundled
    /// cross-encoder, whose score is a probability in [0, 1].
    ///
    /// ```
    /// use bert::{PairScorer, PipelineOptions, ScoreMode};
    /// # fn main() -> bert::Result<()> {
    /// let scorer = PairScorer::load_default(&PipelineOptions::default(), None)?;
    /// assert_eq!(scorer.mode(), ScoreMode::CrossEncoder);
    /// let scores = scorer.score(&[
    ///     ("A man is playing a guitar.", "Someone is playing an instrument."),
    ///     ("A man is playing a guitar.", "A woman is slicing an onion."),
    /// ])?;
    /// assert!(scores[0] > scores[1]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn load_default(options: &PipelineOptions, mode: Option<ScoreMode>) -> Result<Self> {
        let source = default_scorer_model(mode).parse::<ModelSource>()?;
        Self::load(&source, options, mode)
    }

    /// Loads from local files.
    pub fn from_files(
        files: &ModelFiles,
        options: &PipelineOptions,
        mode: Option<ScoreMode>,
    ) -> Result<Self> {
        let config = files.read_config()?;
        let is_classifier = config
            .architectures
            .iter()
            .any(|a| a == "BertForSequenceClassification");
        let mode = match mode {
            Some(mode) => mode,
            None if is_classifier && config.num_labels == 1 => ScoreMode::CrossEncoder,
            None => ScoreMode::BiEncoder,
        };
        let scorer = match mode {
            ScoreMode::BiEncoder => Scorer::Bi(Embedder::from_files(files, options)?),
            ScoreMode::CrossEncoder => {
                if !is_classifier {
                    return Err(Error::checkpoint(
                        &files.dir,
                        "cross-encoder scoring needs a trained BertForSequenceClassification \
                         checkpoint; this one is not (score with the bi-encoder instead)",
                    ));
                }
                if config.num_labels != 1 {
                    return Err(Error::checkpoint(
                        &files.dir,
                        format!(
                            "cross-encoder scoring needs a one-label head (a pair probability); \
                             this classifier has {} labels",
                            config.num_labels
                        ),
                    ));
                }
                let runner = Runner::new(files, &config, options)?;
                let model =
                    load::<BertForSequenceClassification>(files, options.dtype, &runner.device)?
                        .model;
                Scorer::Cross { model, runner }
            }
        };
        Ok(Self { scorer })
    }

    /// How this scorer scores.
    pub fn mode(&self) -> ScoreMode {
        match self.scorer {
            Scorer::Cross { .. } => ScoreMode::CrossEncoder,
            Scorer::Bi(_) => ScoreMode::BiEncoder,
        }
    }

    fn runner(&self) -> &Runner {
        match &self.scorer {
            Scorer::Cross { runner, .. } => runner,
            Scorer::Bi(embedder) => &embedder.runner,
        }
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &BertTokenizer {
        &self.runner().tokenizer
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.runner().device
    }

    /// One score per pair, in input order: a probability (cross-encoder) or a cosine
    /// (bi-encoder).
    pub fn score(&self, pairs: &[(&str, &str)]) -> Result<Vec<f32>> {
        for (i, (a, b)) in pairs.iter().enumerate() {
            self.runner().check_text(|| format!("pair {i} text_a"), a)?;
            self.runner().check_text(|| format!("pair {i} text_b"), b)?;
        }
        match &self.scorer {
            Scorer::Cross { model, runner } => {
                let encoded = runner.tokenizer.encode_pairs(pairs)?;
                runner.run(&encoded, |inputs| {
                    let probs = model.probabilities(inputs)?.to_dtype(DType::F32)?;
                    Ok(probs.squeeze(1)?.to_vec1::<f32>()?)
                })
            }
            Scorer::Bi(embedder) => {
                let (texts, slots) = unique_texts(pairs.iter().flat_map(|(a, b)| [*a, *b]));
                let vectors = embedder.embed_checked(&texts)?;
                Ok(slots
                    .chunks_exact(2)
                    .map(|ab| cosine_similarity(&vectors[ab[0]], &vectors[ab[1]]))
                    .collect())
            }
        }
    }

    /// Documents sorted by their score against `query`, best first.
    pub fn rank(&self, query: &str, docs: &[&str]) -> Result<Vec<Ranked>> {
        self.runner().check_text(|| "query".into(), query)?;
        for (i, doc) in docs.iter().enumerate() {
            self.runner().check_text(|| format!("document {i}"), doc)?;
        }
        let scores = match &self.scorer {
            Scorer::Cross { .. } => {
                let pairs: Vec<(&str, &str)> = docs.iter().map(|d| (query, *d)).collect();
                self.score(&pairs)?
            }
            Scorer::Bi(embedder) => {
                let (texts, slots) =
                    unique_texts(std::iter::once(query).chain(docs.iter().copied()));
                let vectors = embedder.embed_checked(&texts)?;
                let query = &vectors[slots[0]];
                slots[1..]
                    .iter()
                    .map(|&slot| cosine_similarity(query, &vectors[slot]))
                    .collect()
            }
        };
        let mut ranked: Vec<Ranked> = scores
            .into_iter()
            .enumerate()
            .map(|(index, score)| Ranked { index, score })
            .collect();
        ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        Ok(ranked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn device_out_of_memory_says_which_batch_and_what_to_lower() {
        // The text cudarc gives candle for a failed CUDA allocation (no GPU here to fail one).
        let oom = Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let explained = explain_out_of_memory(oom, 32, 512, 8192);
        assert!(matches!(explained, Error::Device(_)));
        let message = explained.to_string();
        assert!(
            message.contains("out of memory running a batch of 32 x 512 tokens")
                && message.contains("lower max_tokens_per_batch (now 8192)"),
            "{message}"
        );
        let other = explain_out_of_memory(Error::Tokenize("x".into()), 1, 1, 1);
        assert!(matches!(other, Error::Tokenize(_)));
    }

    #[test]
    fn pipelines_are_shareable_across_threads() {
        assert_send_sync::<PairScorer>();
        assert_send_sync::<Embedder>();
    }

    #[test]
    fn shared_texts_are_embedded_once() {
        let (texts, slots) = unique_texts(["a", "b", "a", "c", "b", "a"].into_iter());
        assert_eq!(texts, ["a", "b", "c"]);
        assert_eq!(slots, [0, 1, 0, 2, 1, 0]);
        let (texts, slots) = unique_texts(std::iter::empty());
        assert!(texts.is_empty() && slots.is_empty());
    }

    #[test]
    fn cosine_handles_zero_vectors() {
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert!((cosine_similarity(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    }
}
