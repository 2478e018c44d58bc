//! Multi-head self-attention: `BertSelfAttention`, `BertSelfOutput` and `BertAttention` of
//! transformers' models/bert/modeling_bert.py, with the relative position types of the v4
//! implementation (`relative_key`, `relative_key_query`).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{
    attention_probabilities, compute_dtype, fused_attention, fused_attention_block,
    fused_qkv_attention, join_path, AttentionMask, Dropout, Embedding, LayerNorm, Linear,
    NamedLinears, PackedSequences, QkvAttention,
};
use bert_embeddings::{Config, PositionEmbeddingType, Result};

use crate::mask::padding_bias;

/// Scaled dot-product attention over all heads (`attention.self.*`).
#[derive(Debug, Clone)]
pub struct BertSelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// For inference, `query`, `key` and `value` as one `[3 * hidden, hidden]` projection
    /// (see [`BertSelfAttention::fuse_qkv`]).
    qkv: Option<Linear>,
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
            qkv: None,
            distance_embedding,
            position_embedding_type: config.position_embedding_type,
            max_position_embeddings: config.max_position_embeddings,
            dropout: Dropout::new(config.attention_probs_dropout_prob)?,
            num_heads: config.num_attention_heads,
            head_dim,
        })
    }

    /// For inference: one projection in place of `query`, `key` and `value` (their weights
    /// concatenated, in the inference layout), whose packed output the attention kernel reads
    /// in place; one GEMM instead of three. The three layers become views of the fused weight
    /// and bias, so each weight is held once. Inference forward passes (`train == false`) then
    /// use it; training ignores it, and this is for models that will not be trained (the
    /// views are detached). Skipped, as a no-op, with LoRA adapters attached (merge them
    /// first) or relative position scores (they need the split heads anyway).
    pub fn fuse_qkv(&mut self) -> Result<()> {
        let parts = [&self.query, &self.key, &self.value];
        let unfusable = self.qkv.is_some()
            || self.distance_embedding.is_some()
            || parts
                .iter()
                .any(|l| l.adapter().is_some() || l.bias().is_none());
        if unfusable {
            return Ok(());
        }
        // Built straight in the inference layout: the `[in, out]` views side by side are one
        // contiguous `[in, 3 * out]` block (one copy of the weights, no transposing pass).
        let transposed: Vec<Tensor> = parts
            .iter()
            .map(|l| l.weight().detach().t())
            .collect::<candle_core::Result<_>>()?;
        let biases: Vec<Tensor> = parts
            .iter()
            .filter_map(|l| l.bias().map(Tensor::detach))
            .collect();
        let bias = Tensor::cat(&biases, 0)?;
        let stored = Tensor::cat(&transposed, 1)?;
        let mut fused = Linear::new(stored.t()?, Some(bias.clone()));
        // A no-op when the block is already stored as built (kept for one-column edge cases).
        fused.use_inference_layout()?;
        let out_dim = self.query.out_dim();
        // Each part is a column block of the stored [in, 3 * out] block, seen as [out, in].
        let stored = fused.weight().t()?;
        for (i, linear) in [&mut self.query, &mut self.key, &mut self.value]
            .into_iter()
            .enumerate()
        {
            *linear = Linear::new(
                stored.narrow(1, i * out_dim, out_dim)?.t()?,
                Some(bias.narrow(0, i * out_dim, out_dim)?),
            );
        }
        self.qkv = Some(fused);
        Ok(())
    }

    /// `[batch, seq, hidden]` -> `[batch, heads, seq, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        Ok(x.reshape((batch, seq, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Attention of `hidden_states` (`[batch, seq, hidden]`) under `mask`: an additive f32
    /// bias broadcastable to `[batch, heads, seq, seq]`, none, or packed rows
    /// (`[1, tokens, hidden]`, see [`PackedSequences`]). Returns the context in the input's
    /// shape and, with `want_probs`, the attention probabilities `[batch, heads, seq, seq]`
    /// (not for packed rows, whose sequences differ in length: an error).
    pub fn forward<'m>(
        &self,
        hidden_states: &Tensor,
        mask: impl Into<AttentionMask<'m>>,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mask = mask.into();
        let (batch, seq, _) = hidden_states.dims3()?;
        if let AttentionMask::Packed(packed) = mask {
            if want_probs {
                return Err(bert_embeddings::Error::input(
                    "attention probabilities are not returned for packed sequences (their \
                     lengths differ): run the padded batch",
                ));
            }
            if batch != 1 || seq != packed.tokens() {
                return Err(bert_embeddings::Error::input(format!(
                    "packed rows must be [1, {}, hidden], got {:?}",
                    packed.tokens(),
                    hidden_states.dims()
                )));
            }
        }
        let (q, k, v) = match &self.qkv {
            Some(qkv) if !train => {
                let packed = match fused_qkv_attention(
                    hidden_states,
                    qkv,
                    self.num_heads,
                    mask,
                    want_probs,
                )? {
                    QkvAttention::Attended { context, probs } => return Ok((context, probs)),
                    QkvAttention::Projected(packed) => packed,
                };
                let width = packed.dim(2)? / 3;
                (
                    packed.narrow(2, 0, width)?,
                    packed.narrow(2, width, width)?,
                    packed.narrow(2, 2 * width, width)?,
                )
            }
            _ => (
                self.query.forward_t(hidden_states, train)?,
                self.key.forward_t(hidden_states, train)?,
                self.value.forward_t(hidden_states, train)?,
            ),
        };
        self.attend(&q, &k, &v, mask, train, want_probs)
    }

    /// Attention of projected `q`, `k`, `v` (`[batch, seq, hidden]` each) under `mask`:
    /// the CPU kernel where it applies, else composed ops.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: AttentionMask,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (batch, seq, hidden) = q.dims3()?;
        let dtype = q.dtype();
        if self.distance_embedding.is_none() {
            let fused = fused_attention(
                q,
                k,
                v,
                self.num_heads,
                mask,
                train.then_some(&self.dropout),
                want_probs,
            )?;
            if let Some((context, probs)) = fused {
                return Ok((context, probs));
            }
        }
        let bias = match mask {
            AttentionMask::Packed(packed) => return self.attend_padded(q, k, v, packed, train),
            mask => mask.bias(),
        };
        let (q, k, v) = (
            self.split_heads(q)?,
            self.split_heads(k)?,
            self.split_heads(v)?,
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

    /// Packed rows where no kernel takes them (f32 on a GPU, relative positions, training):
    /// `q`, `k` and `v` put back into the padded grid (zeros at padding), attention there under
    /// the grid's padding mask, and the real rows of the context packed again. The layers
    /// around attention still see the real tokens only; the two gathers are a pass each, and
    /// gradients flow through them.
    fn attend_padded(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        packed: &PackedSequences,
        train: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (batch, seq) = (packed.sequences(), packed.padded_len());
        let bias = padding_bias(packed.attention_mask(), batch, seq)?;
        let grid = |t: &Tensor| packed.unpack(&t.contiguous()?);
        let (context, _) = self.attend(
            &grid(q)?,
            &grid(k)?,
            &grid(v)?,
            AttentionMask::Bias(&bias),
            train,
            false,
        )?;
        Ok((packed.pack(&context)?, None))
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
        if seq > self.max_position_embeddings {
            return Err(bert_embeddings::Error::input(format!(
                "sequence of {seq} tokens is longer than max_position_embeddings ({}): the \
                 distance table has no entries that far",
                self.max_position_embeddings
            )));
        }
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
        if !train {
            // The residual joins inside the projection (CPU) or the LayerNorm (CUDA) kernel.
            return Ok(self
                .dense
                .forward_residual_norm(context, residual, &self.layer_norm)?);
        }
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

/// Models that can list their self-attention blocks, mutably: how a model loaded for inference
/// fuses every block's projections ([`BertSelfAttention::fuse_qkv`]).
pub trait SelfAttentions {
    /// Appends every self-attention block, in layer order.
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>);
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

    /// Returns the block's output and, with `want_probs`, the attention probabilities. `mask`
    /// as for [`BertSelfAttention::forward`].
    pub fn forward<'m>(
        &self,
        hidden_states: &Tensor,
        mask: impl Into<AttentionMask<'m>>,
        train: bool,
        want_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mask = mask.into();
        if !train && !want_probs {
            if let Some(out) = self.fused_inference(hidden_states, mask)? {
                return Ok((out, None));
            }
        }
        let (context, probs) =
            self.self_attention
                .forward(hidden_states, mask, train, want_probs)?;
        Ok((self.output.forward(&context, hidden_states, train)?, probs))
    }

    /// The whole block for inference in one CPU kernel where it applies
    /// ([`fused_attention_block`]: the query, key and value fused, absolute positions, f32,
    /// AVX-512, at least two sequences per thread); `None` where it does not.
    fn fused_inference(
        &self,
        hidden_states: &Tensor,
        mask: AttentionMask,
    ) -> Result<Option<Tensor>> {
        let attention = &self.self_attention;
        let Some(qkv) = attention.qkv.as_ref() else {
            return Ok(None);
        };
        if attention.distance_embedding.is_some() {
            return Ok(None);
        }
        Ok(fused_attention_block(
            hidden_states,
            qkv,
            attention.num_heads,
            mask,
            &self.output.dense,
            &self.output.layer_norm,
        )?)
    }
}

impl SelfAttentions for BertSelfAttention {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        out.push(self);
    }
}

impl SelfAttentions for BertAttention {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        out.push(&mut self.self_attention);
    }
}

impl NamedLinears for BertAttention {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.self_attention
            .named_linears(&join_path(prefix, "self"), out);
        self.output.named_linears(&join_path(prefix, "output"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused QKV projection and packed kernel give the three-projection path's context and
    /// probabilities, with a padding bias, in f64 (tight) and f32; fusing twice is a no-op, the
    /// views left in `query`/`key`/`value` still compute their layers, and training ignores
    /// the fused projection.
    #[test]
    fn fused_qkv_matches_separate_projections() {
        let dev = Device::Cpu;
        let config = Config {
            hidden_size: 32,
            num_attention_heads: 4,
            ..Config::default()
        };
        for dtype in [DType::F64, DType::F32] {
            let mut tensors = std::collections::HashMap::new();
            for name in ["query", "key", "value"] {
                let w = Tensor::randn(0f64, 0.3, (32, 32), &dev).unwrap();
                let b = Tensor::randn(0f64, 0.3, 32, &dev).unwrap();
                tensors.insert(format!("{name}.weight"), w.to_dtype(dtype).unwrap());
                tensors.insert(format!("{name}.bias"), b.to_dtype(dtype).unwrap());
            }
            let vb = VarBuilder::from_tensors(tensors, dtype, &dev);
            let separate = BertSelfAttention::load(&config, vb).unwrap();
            let mut fused = separate.clone();
            fused.fuse_qkv().unwrap();
            fused.fuse_qkv().unwrap();
            assert!(fused.qkv.is_some());
            let x = Tensor::randn(0f64, 1.0, (3, 7, 32), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // Sequence 1 has two padded keys, sequence 2 one.
            let mask = Tensor::new(
                &[
                    [1u32, 1, 1, 1, 1, 1, 1],
                    [1, 1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 1, 0],
                ],
                &dev,
            )
            .unwrap();
            let bias = crate::padding_bias(&mask, 3, 7).unwrap();
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(d < tolerance, "{what} {dtype:?}: {d}");
            };
            let (ctx_a, probs_a) = separate.forward(&x, Some(&bias), false, true).unwrap();
            let (ctx_b, probs_b) = fused.forward(&x, Some(&bias), false, true).unwrap();
            close(&ctx_a, &ctx_b, "context");
            close(&probs_a.unwrap(), &probs_b.unwrap(), "probabilities");
            let (ctx_c, probs_c) = fused.forward(&x, Some(&bias), false, false).unwrap();
            close(&ctx_a, &ctx_c, "context without probabilities");
            assert!(probs_c.is_none());
            for (a, b) in [
                (&separate.query, &fused.query),
                (&separate.key, &fused.key),
                (&separate.value, &fused.value),
            ] {
                close(
                    &a.forward(&x).unwrap(),
                    &b.forward(&x).unwrap(),
                    "view layer",
                );
            }
            // train = true takes the three projections (no dropout configured to differ: p = 0).
            let no_dropout = BertSelfAttention {
                dropout: Dropout::new(0.0).unwrap(),
                ..fused.clone()
            };
            let (ctx_d, _) = no_dropout.forward(&x, Some(&bias), true, false).unwrap();
            close(&ctx_a, &ctx_d, "training path of a fused block");
        }
    }
}
