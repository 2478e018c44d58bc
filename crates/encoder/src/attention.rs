//! Multi-head self-attention: `BertSelfAttention`, `BertSelfOutput` and `BertAttention` of
//! transformers' models/bert/modeling_bert.py, with the relative position types of the v4
//! implementation (`relative_key`, `relative_key_query`).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{
    attention_probabilities, compute_dtype, fused_attention, join_path, Dropout, Embedding,
    LayerNorm, Linear, NamedLinears,
};
use bert_embeddings::{Config, PositionEmbeddingType, Result};

/// Scaled dot-product attention over all heads (`attention.self.*`).
#[derive(Debug, Clone)]
pub struct BertSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// `[2 * max_position_embeddings - 1, head_dim]` distance table of the relative types.
    distance_embedding: Option<Embedding>,
    position_embedding_type: PositionEmbeddingType,
    max_position_embeddings: usize,
    dropout: Dropout,
    num_heads: usize,
    head_dim: usize,
}

impl BertSelfAttention {
    /// Loads `query`, `key`, `value` (and `distance_embedding`) under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let distance_embedding = if config.position_embedding_type.is_relative() {
            Some(Embedding::load(
                2 * config.max_position_embeddings - 1,
                head_dim,
                vb.pp("distance_embedding"),
            )?)
        } else {
            None
        };
        Ok(Self {
            query: Linear::load(hidden, hidden, vb.pp("query"))?,
            key: Linear::load(hidden, hidden, vb.pp("key"))?,
            value: Linear::load(hidden, hidden, vb.pp("value"))?,
            distance_embedding,
            position_embedding_type: config.position_embedding_type,
            max_position_embeddings: config.max_position_embeddings,
            dropout: Dropout::new(config.attention_probs_dropout_prob)?,
            num_heads: config.num_attention_heads,
            head_dim,
        })
    }

    /// `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        Ok(x.reshape((batch, seq, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Attention of `hidden_states` (`[batch, seq, hidden]`) with an additive f32 `bias`
    /// broadcastable to `[batch, heads, seq, seq]`. Returns the context `[batch, seq, hidden]`
    /// and, with `want_probs`, the attention probabilities `[batch, heads, seq, seq]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (batch, seq, hidden) = hidden_states.dims3()?;
        let dtype = hidden_states.dtype();
        let q = self.query.forward_t(hidden_states, train)?;
        let k = self.key.forward_t(hidden_states, train)?;
        let v = self.value.forward_t(hidden_states, train)?;
        if self.distance_embedding.is_none() {
            let fused = fused_attention(
                &q,
                &k,
                &v,
                self.num_heads,
                bias,
                train.then_some(&self.dropout),
                want_probs,
            )?;
            if let Some((context, probs)) = fused {
                return Ok((context, probs));
            }
        }
        let (q, k, v) = (
            self.split_heads(&q)?,
            self.split_heads(&k)?,
            self.split_heads(&v)?,
        );
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(table) = &self.distance_embedding {
            scores = (scores + self.relative_scores(table, &q, &k, seq)?)?;
        }
        // Softmax in f32 whatever the model dtype: finite masking and accurate sums.
        let probs = attention_probabilities(
            &scores.to_dtype(compute_dtype(dtype))?,
            bias,
            1.0 / (self.head_dim as f64).sqrt(),
        )?
        .to_dtype(dtype)?;
        let dropped = self.dropout.forward(&probs, train)?;
        let context = dropped
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        Ok((context, want_probs.then_some(probs)))
    }

    /// Scores from the distance table: `einsum("bhld,lrd->bhlr", q, P)` for `relative_key`,
    /// plus `einsum("bhrd,lrd->bhlr", k, P)` for `relative_key_query`, where
    /// `P[l, r] = distance_embedding[l - r + max_positions - 1]`.
    fn relative_scores(
        &self,
        table: &Embedding,
        q: &Tensor,
        k: &Tensor,
        seq: usize,
    ) -> Result<Tensor> {
        let (batch, heads, _, head_dim) = q.dims4()?;
        let device = q.device();
        let offset = (self.max_position_embeddings - 1) as i64;
        let left = Tensor::arange(0i64, seq as i64, device)?.reshape((seq, 1))?;
        let right = Tensor::arange(0i64, seq as i64, device)?.reshape((1, seq))?;
        let distance = (left.broadcast_sub(&right)? + offset as f64)?.to_dtype(DType::U32)?;
        // [l, r, d]
        let positional = table.forward(&distance)?.to_dtype(q.dtype())?;

        // Query side: for every l, q[.., l, :] @ P[l]^T  -> [l, b*h, r].
        let q_by_pos = q
            .reshape((batch * heads, seq, head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let query_scores = q_by_pos
            .matmul(&positional.transpose(1, 2)?)?
            .reshape((seq, batch, heads, seq))?
            .permute((1, 2, 0, 3))?;
        if self.position_embedding_type != PositionEmbeddingType::RelativeKeyQuery {
            return Ok(query_scores.contiguous()?);
        }
        // Key side: for every r, k[.., r, :] @ P[:, r]^T -> [r, b*h, l].
        let k_by_pos = k
            .reshape((batch * heads, seq, head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let positional_by_r = positional.transpose(0, 1)?.transpose(1, 2)?.contiguous()?;
        let key_scores = k_by_pos
            .matmul(&positional_by_r)?
            .reshape((seq, batch, heads, seq))?
            .permute((1, 2, 3, 0))?;
        Ok((query_scores + key_scores)?.contiguous()?)
    }
}

impl NamedLinears for BertSelfAttention {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.query.named_linears(&join_path(prefix, "query"), out);
        self.key.named_linears(&join_path(prefix, "key"), out);
        self.value.named_linears(&join_path(prefix, "value"), out);
    }
}

/// Output projection, dropout, residual and LayerNorm after attention (`attention.output.*`).
#[derive(Debug, Clone)]
pub struct BertSelfOutput {
    dense: Linear,
    layer_norm: LayerNorm,
    dropout: Dropout,
}

impl BertSelfOutput {
    /// Loads `dense` and `LayerNorm` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            dense: Linear::load(hidden, hidden, vb.pp("dense"))?,
            layer_norm: LayerNorm::load(hidden, config.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: Dropout::new(config.hidden_dropout_prob)?,
        })
    }

    /// `LayerNorm(dropout(dense(context)) + residual)`.
    pub fn forward(&self, context: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let projected = self
            .dense
            .forward_dropout(context, Some(&self.dropout), train)?;
        Ok(self.layer_norm.forward(&(projected + residual)?)?)
    }
}

impl NamedLinears for BertSelfOutput {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.dense.named_linears(&join_path(prefix, "dense"), out);
    }
}

/// Self-attention followed by its output block (`attention.*`).
#[derive(Debug, Clone)]
pub struct BertAttention {
    self_attention: BertSelfAttention,
    output: BertSelfOutput,
}

impl BertAttention {
    /// Loads `self` and `output` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attention: BertSelfAttention::load(config, vb.pp("self"))?,
            output: BertSelfOutput::load(config, vb.pp("output"))?,
        })
    }

    /// Returns the block's output and, with `want_probs`, the attention probabilities.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (context, probs) =
            self.self_attention
                .forward(hidden_states, bias, train, want_probs)?;
        Ok((self.output.forward(&context, hidden_states, train)?, probs))
    }
}

impl NamedLinears for BertAttention {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.self_attention
            .named_linears(&join_path(prefix, "self"), out);
        self.output.named_linears(&join_path(prefix, "output"), out);
    }
}
