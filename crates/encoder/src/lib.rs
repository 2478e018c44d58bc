//! The BERT encoder: multi-head self-attention with an additive padding mask that stays finite
//! in f32, f16 and bf16; absolute and relative (`relative_key`, `relative_key_query`) position
//! handling; the feed-forward block; residual + LayerNorm; and the layer stack, with optional
//! per-layer hidden states and attention probabilities.
//!
//! Module and field names follow transformers' `modeling_bert.py`, so weight paths read like the
//! checkpoint: `encoder.layer.3.attention.self.query.weight` is
//! `BertEncoder -> BertLayer -> BertAttention -> BertSelfAttention -> query`.

pub mod attention;
pub mod encoder;
pub mod feed_forward;
pub mod layer;
pub mod mask;

pub use attention::{BertAttention, BertSelfAttention, BertSelfOutput, SelfAttentions};
pub use encoder::{BertEncoder, EncoderOutput, ForwardOptions};
pub use feed_forward::{BertIntermediate, BertOutput};
pub use layer::BertLayer;
pub use mask::{padding_bias, MASKED_SCORE};
