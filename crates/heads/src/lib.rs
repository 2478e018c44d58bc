//! BERT heads and the full models users load checkpoints for: [`BertModel`] (embeddings +
//! encoder + [`BertPooler`]), [`BertForSequenceClassification`] (the cross-encoder of pair
//! scoring), [`BertForMaskedLM`], [`BertForNextSentencePrediction`] and [`BertForPreTraining`].
//!
//! Each mirrors the transformers class of the same name, and weights load from the same paths.

pub mod classifier;
pub mod masked_lm;
pub mod model;
pub mod next_sentence;
pub mod pooler;

pub use classifier::{
    BertForSequenceClassification, ClassifierActivation, SequenceClassifierOutput,
};
pub use masked_lm::{
    BertForMaskedLM, BertLMPredictionHead, BertPredictionHeadTransform, MaskedLMOutput,
};
pub use model::{BertInputs, BertModel, BertModelOutput};
pub use next_sentence::{
    BertForNextSentencePrediction, BertForPreTraining, BertNspHead, NextSentencePredictorOutput,
    PreTrainingOutput,
};
pub use pooler::BertPooler;
