//! `BertEmbeddings`: word + token-type (segment) + absolute position tables, summed, then
//! LayerNorm and dropout. Mirrors `BertEmbeddings` in transformers' models/bert/modeling_bert.py;
//! field names follow the checkpoint (`embeddings.word_embeddings.weight`, ...).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Config, PositionEmbeddingType};
use crate::error::{Error, Result};
use crate::nn::{Dropout, Embedding, LayerNorm};

/// The input layer of BERT.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: Dropout,
    position_embedding_type: PositionEmbeddingType,
}

impl BertEmbeddings {
    /// Loads the tables under `vb` (the `embeddings.` prefix of a checkpoint).
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            word_embeddings: Embedding::load(config.vocab_size, hidden, vb.pp("word_embeddings"))?,
            // HF creates the position table for every position type, so checkpoints carry it.
            position_embeddings: Embedding::load(
                config.max_position_embeddings,
                hidden,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: Embedding::load(
                config.type_vocab_size,
                hidden,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: LayerNorm::load(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: Dropout::new(config.hidden_dropout_prob)?,
            position_embedding_type: config.position_embedding_type,
        })
    }

    /// The word table, which the masked-LM decoder shares when embeddings are tied.
    pub fn word_embeddings(&self) -> &Embedding {
        &self.word_embeddings
    }

    /// Embeds `input_ids` (`[batch, seq]`, integer dtype).
    ///
    /// `token_type_ids` default to zeros (sentence A) and `position_ids` to `0..seq`, as in
    /// transformers. Ids outside their table are an [`Error::Input`], never an out-of-bounds
    /// read.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.check_ids(input_ids, token_type_ids, position_ids)?;
        let (batch, seq) = input_ids.dims2()?;
        let max_positions = self.position_embeddings.rows();
        // With explicit positions (a packed batch's run past 512 rows) their ids are checked.
        if position_ids.is_none() && seq > max_positions {
            return Err(Error::input(format!(
                "sequence of {seq} tokens is longer than max_position_embeddings \
                 ({max_positions})"
            )));
        }

        let mut embeddings = self.word_embeddings.forward(input_ids)?;
        let token_type = match token_type_ids {
            Some(ids) => self.token_type_embeddings.forward(ids)?,
            // Every row of an all-zero type tensor is row 0 of the table: broadcast it.
            None => self
                .token_type_embeddings
                .weight()
                .get(0)?
                .broadcast_as(embeddings.shape())?,
        };
        embeddings = (embeddings + token_type)?;

        if self.position_embedding_type == PositionEmbeddingType::Absolute {
            let positions = match position_ids {
                // [1, seq] or [batch, seq] (`check_ids`).
                Some(ids) => self
                    .position_embeddings
                    .forward(&ids.broadcast_as((batch, seq))?.contiguous()?)?,
                None => self
                    .position_embeddings
                    .weight()
                    .narrow(0, 0, seq)?
                    .unsqueeze(0)?,
            };
            embeddings = embeddings.broadcast_add(&positions)?;
        }

        let embeddings = self.layer_norm.forward(&embeddings)?;
        Ok(self.dropout.forward(&embeddings, train)?)
    }

    /// The checks [`BertEmbeddings::forward`] makes of the token, segment and position ids
    /// (these only where absolute positions read them): shapes, integer dtypes, every id
    /// inside its table. Public for callers that embed only some positions of a batch (a
    /// padding-free pass) and must refuse what the whole batch would have refused.
    pub fn check_ids(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<()> {
        let (batch, seq) = input_ids.dims2().map_err(|_| {
            Error::input(format!(
                "input_ids must be [batch, seq], got shape {:?}",
                input_ids.dims()
            ))
        })?;
        check_ids("input_ids", input_ids, self.word_embeddings.rows())?;
        if let Some(ids) = token_type_ids {
            check_same_shape("token_type_ids", ids, input_ids)?;
            check_ids("token_type_ids", ids, self.token_type_embeddings.rows())?;
        }
        let absolute = self.position_embedding_type == PositionEmbeddingType::Absolute;
        if let Some(ids) = position_ids.filter(|_| absolute) {
            if ids.dims() != [1, seq] && ids.dims() != [batch, seq] {
                return Err(Error::input(format!(
                    "position_ids must be [batch, seq] or [1, seq] = [{batch}, {seq}], got {:?}",
                    ids.dims()
                )));
            }
            check_ids("position_ids", ids, self.position_embeddings.rows())?;
        }
        Ok(())
    }
}

/// Checks that every id is in `0..rows`.
fn check_ids(name: &str, ids: &Tensor, rows: usize) -> Result<()> {
    if !ids.dtype().is_int() {
        return Err(Error::input(format!(
            "{name} must have an integer dtype, got {:?}",
            ids.dtype()
        )));
    }
    if ids.elem_count() == 0 {
        return Ok(());
    }
    let as_f64 = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let min = as_f64(ids.min_all()?)?;
    let max = as_f64(ids.max_all()?)?;
    if min < 0.0 || max >= rows as f64 {
        let bad = if min < 0.0 { min } else { max };
        return Err(Error::input(format!(
            "{name} contains {bad}, outside the table of {rows} rows"
        )));
    }
    Ok(())
}

fn check_same_shape(name: &str, t: &Tensor, input_ids: &Tensor) -> Result<()> {
    if t.dims() != input_ids.dims() {
        return Err(Error::input(format!(
            "{name} has shape {:?} but input_ids has {:?}",
            t.dims(),
            input_ids.dims()
        )));
    }
    Ok(())
}
