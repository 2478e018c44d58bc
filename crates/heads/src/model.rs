//! `BertModel`: embeddings, encoder and (optionally) the pooler, as transformers' `BertModel`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, Linear, NamedLinears, PackedSequences};
use bert_embeddings::{BertEmbeddings, Config, Result};
use bert_encoder::{BertEncoder, BertSelfAttention, ForwardOptions, SelfAttentions};

use crate::pooler::BertPooler;

/// The inputs of one forward pass, HF's argument names.
#[derive(Debug, Clone, Copy)]
pub struct BertInputs<'a> {
    /// `[batch, seq]` token ids (u8, u32 or i64).
    pub input_ids: &'a Tensor,
    /// `[batch, seq]`, 1 for tokens and 0 for padding; `None` attends everywhere.
    pub attention_mask: Option<&'a Tensor>,
    /// `[batch, seq]` segment ids (0 for sentence A, 1 for B); `None` means all zeros.
    pub token_type_ids: Option<&'a Tensor>,
    /// `[batch, seq]` or `[1, seq]` positions; `None` means `0..seq`.
    pub position_ids: Option<&'a Tensor>,
}

impl<'a> BertInputs<'a> {
    /// Inputs with only token ids.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            token_type_ids: None,
            position_ids: None,
        }
    }

    /// Sets the padding mask.
    pub fn with_attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// Sets the segment ids.
    pub fn with_token_type_ids(mut self, ids: &'a Tensor) -> Self {
        self.token_type_ids = Some(ids);
        self
    }

    /// Sets the position ids.
    pub fn with_position_ids(mut self, ids: &'a Tensor) -> Self {
        self.position_ids = Some(ids);
        self
    }
}

/// What [`BertModel::forward`] returns, as HF's `BaseModelOutputWithPooling`.
#[derive(Debug, Clone)]
pub struct BertModelOutput {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// `[batch, hidden]` pooled `[CLS]` state, when the model has a pooler.
    pub pooler_output: Option<Tensor>,
    /// Embedding output and every layer's output, when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// The bare encoder with embeddings and optional pooler.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    pooler: Option<BertPooler>,
    config: Config,
}

impl BertModel {
    /// Loads `embeddings.*`, `encoder.*` and, with `add_pooling_layer`, `pooler.*` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder, add_pooling_layer: bool) -> Result<Self> {
        Ok(Self {
            embeddings: BertEmbeddings::load(config, vb.pp("embeddings"))?,
            encoder: BertEncoder::load(config, vb.pp("encoder"))?,
            pooler: if add_pooling_layer {
                Some(BertPooler::load(config, vb.pp("pooler"))?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The embeddings layer.
    pub fn embeddings(&self) -> &BertEmbeddings {
        &self.embeddings
    }

    /// The layer stack.
    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    /// The pooler, if loaded.
    pub fn pooler(&self) -> Option<&BertPooler> {
        self.pooler.as_ref()
    }

    /// Runs embeddings, encoder and pooler. With [`ForwardOptions::skip_padding`], a batch
    /// padded at its rows' ends runs padding-free.
    pub fn forward(
        &self,
        inputs: &BertInputs,
        options: &ForwardOptions,
    ) -> Result<BertModelOutput> {
        if options.skip_padding && !options.output_attentions {
            if let Some(mask) = inputs.attention_mask {
                // Shapes first, so a bad mask gets the padded path's own error.
                if mask.dims() == inputs.input_ids.dims() {
                    if let Some(packed) = PackedSequences::from_attention_mask(mask)? {
                        return self.forward_packed(inputs, &packed, options);
                    }
                }
            }
        }
        let embedded = self.embed(
            inputs.input_ids,
            inputs.token_type_ids,
            inputs.position_ids,
            options,
        )?;
        let encoded = self
            .encoder
            .forward(&embedded, inputs.attention_mask, options)?;
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|pooler| pooler.forward(&encoded.last_hidden_state, options.train))
            .transpose()?;
        Ok(BertModelOutput {
            last_hidden_state: encoded.last_hidden_state,
            pooler_output,
            hidden_states: encoded.hidden_states,
            attentions: encoded.attentions,
        })
    }
}

impl BertModel {
    /// The embeddings' output, in the compute dtype the layers after them run in.
    fn embed(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        options: &ForwardOptions,
    ) -> Result<Tensor> {
        let embedded =
            self.embeddings
                .forward(input_ids, token_type_ids, position_ids, options.train)?;
        Ok(match options.compute_dtype {
            Some(dtype) if dtype != embedded.dtype() => embedded.to_dtype(dtype)?,
            _ => embedded,
        })
    }

    /// [`BertModel::forward`] over the real tokens of `packed`'s sequences only: the inputs
    /// are gathered into packed rows, the layers run over them, and the outputs are put back
    /// into the batch's grid with zeros at the padded positions.
    fn forward_packed(
        &self,
        inputs: &BertInputs,
        packed: &PackedSequences,
        options: &ForwardOptions,
    ) -> Result<BertModelOutput> {
        // Padded positions are not embedded, but a batch the padded pass would refuse is
        // refused here too.
        self.embeddings
            .check_ids(inputs.input_ids, inputs.token_type_ids, inputs.position_ids)?;
        let seq = packed.padded_len();
        let max_positions = self.config.max_position_embeddings;
        if seq > max_positions {
            return Err(bert_embeddings::Error::input(format!(
                "sequence of {seq} tokens is longer than max_position_embeddings \
                 ({max_positions})"
            )));
        }
        let input_ids = packed.pack(inputs.input_ids)?;
        let token_type_ids = inputs
            .token_type_ids
            .map(|ids| packed.pack(ids))
            .transpose()?;
        let position_ids = match inputs.position_ids {
            Some(ids) => {
                let grid = ids.broadcast_as(inputs.input_ids.dims())?.contiguous()?;
                packed.pack(&grid)?
            }
            None => packed.positions()?,
        };
        let embedded = self.embed(
            &input_ids,
            token_type_ids.as_ref(),
            Some(&position_ids),
            options,
        )?;
        let encoded = self.encoder.forward_packed(&embedded, packed, options)?;
        let last_hidden_state = packed.unpack(&encoded.last_hidden_state)?;
        let hidden_states = encoded
            .hidden_states
            .map(|all| all.iter().map(|h| packed.unpack(h)).collect::<Result<_>>())
            .transpose()?;
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|pooler| pooler.forward(&last_hidden_state, options.train))
            .transpose()?;
        Ok(BertModelOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
            attentions: None,
        })
    }
}

impl SelfAttentions for BertModel {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        self.encoder.self_attentions(out);
    }
}

impl NamedLinears for BertModel {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.encoder
            .named_linears(&join_path(prefix, "encoder"), out);
        if let Some(pooler) = &mut self.pooler {
            pooler.named_linears(&join_path(prefix, "pooler"), out);
        }
    }
}
