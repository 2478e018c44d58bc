//! The layer stack (`BertEncoder`, `encoder.layer.*`).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use bert_embeddings::nn::{join_path, AttentionMask, Linear, NamedLinears, PackedSequences};
use bert_embeddings::{Config, Result};

use crate::attention::{BertSelfAttention, SelfAttentions};
use crate::layer::BertLayer;
use crate::mask::padding_bias;

/// The most tokens (batch x sequence) of an inference pass that [`BertEncoder::forward`] moves
/// onto a rayon pool thread (see there): 8 x 128 gained ~8%, 32 x 128 nothing.
const ON_POOL_MAX_TOKENS: usize = 1024;

/// What a forward pass computes besides the last hidden state, and whether it trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Training mode: dropout drops. Off for inference.
    pub train: bool,
    /// Return the embedding output and every layer's output.
    pub output_hidden_states: bool,
    /// Return every layer's attention probabilities.
    pub output_attentions: bool,
    /// Mixed precision: the layers after the embeddings compute in this dtype while every
    /// weight stays in its own (cast on the fly, so gradients reach f32 master weights);
    /// embeddings, LayerNorm and softmax statistics stay in f32. `None`: the weights' dtype.
    pub compute_dtype: Option<DType>,
    /// Padding-free batches: where the attention mask pads some rows at their end, the model
    /// runs every layer over the real tokens only (packed, see [`PackedSequences`]), so
    /// padded positions cost nothing. The real positions' outputs are the padded batch's; the
    /// padded positions of `last_hidden_state` and `hidden_states` are zeros (transformers
    /// computes values there that mean nothing). Attention takes the packed rows where a
    /// kernel does (the CPU's f32/f64 kernels, the CUDA kernel in f16/bf16 inference); elsewhere
    /// (f32 on a GPU, relative positions, training) each layer puts its query, key and value
    /// back into the padded grid for attention alone. Masks of another form (left padding,
    /// holes, empty rows) and `output_attentions` run the padded batch.
    pub skip_padding: bool,
}

impl ForwardOptions {
    /// Inference: no dropout, only the last hidden state.
    pub fn inference() -> Self {
        Self::default()
    }

    /// Training: dropout active.
    pub fn training() -> Self {
        Self {
            train: true,
            ..Self::default()
        }
    }

    /// Also return all hidden states.
    pub fn with_hidden_states(mut self) -> Self {
        self.output_hidden_states = true;
        self
    }

    /// Also return all attention probabilities.
    pub fn with_attentions(mut self) -> Self {
        self.output_attentions = true;
        self
    }

    /// Run padded batches padding-free: see [`ForwardOptions::skip_padding`].
    pub fn with_skip_padding(mut self) -> Self {
        self.skip_padding = true;
        self
    }

    /// Compute in `dtype` (bf16, f16) over weights kept in theirs: see
    /// [`ForwardOptions::compute_dtype`].
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }
}

/// The encoder's outputs, as HF's `BaseModelOutput`.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// `[batch, seq, hidden]` output of the last layer.
    pub last_hidden_state: Tensor,
    /// The input and every layer's output (`num_layers + 1` tensors), when asked for.
    pub hidden_states: Option<Vec<Tensor>>,
    /// Every layer's `[batch, heads, seq, seq]` attention probabilities, when asked for.
    pub attentions: Option<Vec<Tensor>>,
}

/// `encoder.*`: `num_hidden_layers` [`BertLayer`]s.
#[derive(Debug, Clone)]
pub struct BertEncoder {
    layers: Vec<BertLayer>,
}

impl BertEncoder {
    /// Loads `layer.0` .. `layer.{N-1}` under `vb`.
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layer");
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(config, vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[BertLayer] {
        &self.layers
    }

    /// Runs the stack over `hidden_states` (`[batch, seq, hidden]`). `attention_mask`
    /// (`[batch, seq]`, 1 for tokens, 0 for padding) keeps padded keys out of attention.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
        options: &ForwardOptions,
    ) -> Result<EncoderOutput> {
        let (batch, seq, _) = hidden_states.dims3()?;
        let bias = attention_mask
            .map(|mask| padding_bias(mask, batch, seq))
            .transpose()?;
        self.run(hidden_states, bias.as_ref().into(), options)
    }

    /// Runs the stack over packed rows (`[1, tokens, hidden]`, the real tokens of
    /// `packed`'s sequences one after another), each token attending to its own sequence.
    /// Every output is packed likewise; attention probabilities are not returned (an error).
    pub fn forward_packed(
        &self,
        hidden_states: &Tensor,
        packed: &PackedSequences,
        options: &ForwardOptions,
    ) -> Result<EncoderOutput> {
        if options.output_attentions {
            return Err(bert_embeddings::Error::input(
                "attention probabilities are not returned for packed sequences (their lengths \
                 differ): run the padded batch",
            ));
        }
        self.run(hidden_states, AttentionMask::Packed(packed), options)
    }

    fn run(
        &self,
        hidden_states: &Tensor,
        mask: AttentionMask,
        options: &ForwardOptions,
    ) -> Result<EncoderOutput> {
        let (batch, seq, _) = hidden_states.dims3()?;
        // Short f32 inference passes on the CPU run their parallel loops on a team of threads
        // that spin between loops instead of sleeping on rayon's (1 x 16: the futex sleeps and
        // wake-ups were ~15% of the pass). Not from inside rayon's pool: there other passes
        // are likely running on the other threads, and spinning helpers would compete with them.
        if !options.train
            && hidden_states.device().is_cpu()
            && bert_embeddings::team::suits(batch * seq, hidden_states.dtype())
            && !bert_embeddings::team::active()
            && rayon::current_thread_index().is_none()
        {
            return bert_embeddings::team::with_team(|| self.run(hidden_states, mask, options));
        }
        // Other short inference passes on the CPU (up to 1024 tokens, or not f32) run on a
        // thread of rayon's pool, which the kernels' parallel loops then share. Run from the
        // caller's own thread, the caller and every pool thread were runnable at once (3
        // threads on 2 cores): the pool spun for work while the caller ran the serial steps
        // between kernels (1 x 16: ~15% of the pass, before the team). Long passes gained
        // nothing measurable and, allocating their large outputs in the pool thread's malloc
        // arena, peaked 40-90 MB higher. Training stays on the caller's thread, whose seeded
        // dropout stream is thread-local.
        if !options.train
            && batch * seq <= ON_POOL_MAX_TOKENS
            && hidden_states.device().is_cpu()
            && rayon::current_thread_index().is_none()
            && !bert_embeddings::team::active()
        {
            return rayon::join(|| self.run(hidden_states, mask, options), || ()).0;
        }
        let mut all_hidden = options.output_hidden_states.then(Vec::new);
        let mut all_attentions = options.output_attentions.then(Vec::new);
        let mut hidden = hidden_states.clone();
        for layer in &self.layers {
            if let Some(all) = all_hidden.as_mut() {
                all.push(hidden.clone());
            }
            let (next, probs) =
                layer.forward(&hidden, mask, options.train, options.output_attentions)?;
            if let (Some(all), Some(probs)) = (all_attentions.as_mut(), probs) {
                all.push(probs);
            }
            hidden = next;
        }
        if let Some(all) = all_hidden.as_mut() {
            all.push(hidden.clone());
        }
        Ok(EncoderOutput {
            last_hidden_state: hidden,
            hidden_states: all_hidden,
            attentions: all_attentions,
        })
    }
}

impl SelfAttentions for BertEncoder {
    fn self_attentions<'a>(&'a mut self, out: &mut Vec<&'a mut BertSelfAttention>) {
        for layer in &mut self.layers {
            layer.self_attentions(out);
        }
    }
}

impl NamedLinears for BertEncoder {
    fn named_linears<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        let prefix = join_path(prefix, "layer");
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.named_linears(&join_path(&prefix, &i.to_string()), out);
        }
    }
}
