//! BERT's attention block for f32 inference in one kernel, sequence by sequence:
//! `LayerNorm(attention(x Wqkv^T + bqkv) Wo^T + bo + x)` (`BertSelfAttention` with its query,
//! key and value fused, then `BertSelfOutput`).

use super::feed_forward::OutputNorm;
use super::*;
use crate::panel_gemm::PanelWeights;

/// The fused attention block. Inputs: `x`, `[batch, seq, hidden]` contiguous (or packed
/// rows, `[1, tokens, hidden]`, with `starts`). No backward
/// (see `nn::fused_attention_block` for when it runs).
#[derive(Debug, Clone)]
pub(crate) struct AttentionBlockOp {
    /// `query`, `key` and `value` side by side, packed: `hidden -> 3 hidden`.
    pub qkv: Arc<PanelWeights>,
    pub qkv_bias: Vec<f32>,
    pub heads: usize,
    /// `[batch, seq]` additive mask (the padding), shared by every head and query.
    pub mask: Option<Vec<f32>>,
    /// Packed rows instead (`[1, tokens, hidden]`, no mask): sequence `i` is rows
    /// `starts[i] .. starts[i + 1]`.
    pub starts: Option<Arc<[usize]>>,
    /// `output.dense` (`hidden -> hidden`) and `output.LayerNorm`.
    pub output: OutputNorm,
}

/// One thread's buffers for its sequences.
#[derive(Default)]
struct SequenceScratch {
    qkv: Vec<f32>,
    context: Vec<f32>,
    summed: Vec<f32>,
    head: crate::tiled_attention::HeadScratch,
}

impl AttentionBlockOp {
    fn forward(&self, x: &[f32], batch: usize, seq: usize) -> candle_core::Result<Vec<f32>> {
        let hidden = self.output.hidden();
        let head_dim = hidden / self.heads.max(1);
        let consistent = self.heads > 0
            && hidden.is_multiple_of(self.heads)
            && crate::tiled_attention::supports(head_dim)
            && self.qkv.fits(hidden, 3 * hidden)
            && self.qkv_bias.len() == 3 * hidden
            && self.output.fits(hidden)
            && x.len() == batch * seq * hidden
            && self.mask.as_ref().is_none_or(|m| m.len() == batch * seq)
            && self
                .starts
                .as_ref()
                .is_none_or(|s| self.mask.is_none() && starts_cover(s, batch * seq));
        if !consistent {
            candle_core::bail!(
                "bert-attention-block: input of {} floats for [{batch}, {seq}, {hidden}] with {} \
                 heads",
                x.len(),
                self.heads
            )
        }
        // Sequence b: its rows, as floats.
        let floats = |b: usize| match &self.starts {
            Some(s) => s[b] * hidden..s[b + 1] * hidden,
            None => b * seq * hidden..(b + 1) * seq * hidden,
        };
        let sequences = self.starts.as_ref().map_or(batch, |s| s.len() - 1);
        Ok(written_by_tasks(
            batch * seq * hidden,
            sequences,
            floats,
            SequenceScratch::default,
            |scratch, b, y| {
                let mask = self.mask.as_ref().map(|m| &m[b * seq..(b + 1) * seq]);
                self.sequence(&x[floats(b)], mask, y, scratch);
            },
        ))
    }

    /// One sequence `x` (`seq` rows) into `y`, on this thread.
    fn sequence(
        &self,
        x: &[f32],
        mask: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut SequenceScratch,
    ) {
        let hidden = self.output.hidden();
        let seq = x.len() / hidden;
        let head_dim = hidden / self.heads;
        let SequenceScratch {
            qkv,
            context,
            summed,
            head,
        } = scratch;
        qkv.resize(seq * 3 * hidden, 0.0);
        self.qkv.multiply_bias_here(x, seq, &self.qkv_bias, qkv);
        context.resize(seq * hidden, 0.0);
        let scale = 1.0 / (head_dim as f32).sqrt();
        for h in 0..self.heads {
            let q = qkv[h * head_dim..].as_ptr();
            // SAFETY: supported (checked in `forward`); q, k and v hold `seq` rows of stride
            // 3 hidden from their head's column on; the context rows hold `hidden`, this
            // head's `head_dim` of them written, apart from the inputs.
            unsafe {
                crate::tiled_attention::attention_head(
                    q,
                    q.add(hidden),
                    q.add(2 * hidden),
                    3 * hidden,
                    seq,
                    head_dim,
                    scale,
                    mask,
                    context.as_mut_ptr().add(h * head_dim),
                    hidden,
                    head,
                );
            }
        }
        self.output.apply(context, x, summed, y);
    }
}

impl CustomOp1 for AttentionBlockOp {
    fn name(&self) -> &'static str {
        "bert-attention-block"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (batch, seq, _) = xl.shape().dims3()?;
        let out = match x {
            CpuStorage::F32(x) => self.forward(contiguous(x, xl, name)?, batch, seq)?,
            _ => candle_core::bail!("{name}: f32 input expected"),
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
