//! BERT's feed-forward block for f32 inference in one kernel, block of rows by block of rows:
//! `LayerNorm(gelu(x W1^T + b1) W2^T + b2 + x)` (`BertIntermediate`, then `BertOutput`).

use super::gelu::gelu;
use super::layer_norm::layer_norm_row_f32;
use super::*;
use crate::panel_gemm::PanelWeights;

/// Rows per block: the block's intermediate activations (48 x 1536 floats at MiniLM's and
/// BERT-base's 4x widening, 288 KiB) stay in L2 from the first product, through the GELU,
/// to the second, where the unfused layers wrote the whole `[rows, 4 hidden]` tensor (25 MB at
/// 8 x 512) out to memory and read it back twice.
const BLOCK_ROWS: usize = 48;

/// The fused feed-forward block. Inputs: `x`, `[.., hidden]` contiguous. No backward (see
/// `nn::fused_feed_forward` for when it runs).
#[derive(Debug, Clone)]
pub(crate) struct FeedForwardOp {
    /// `intermediate.dense`, packed: `hidden -> inner`.
    pub intermediate: Arc<PanelWeights>,
    pub intermediate_bias: Vec<f32>,
    /// `output.dense` (`inner -> hidden`) and `output.LayerNorm`.
    pub output: OutputNorm,
}

/// BERT's output tail, which both fused blocks end in: `LayerNorm(input W^T + b + residual)`.
#[derive(Debug, Clone)]
pub(crate) struct OutputNorm {
    /// The dense layer, packed: `in -> hidden`.
    pub dense: Arc<PanelWeights>,
    pub bias: Vec<f32>,
    pub norm_weight: Vec<f32>,
    pub norm_bias: Vec<f32>,
    pub eps: f64,
}

impl OutputNorm {
    /// The output width.
    pub(super) fn hidden(&self) -> usize {
        self.bias.len()
    }

    /// Whether the parts fit each other and an input of `in_dim`.
    pub(super) fn fits(&self, in_dim: usize) -> bool {
        let hidden = self.hidden();
        self.dense.fits(in_dim, hidden)
            && self.norm_weight.len() == hidden
            && self.norm_bias.len() == hidden
    }

    /// `y = LayerNorm(input W^T + bias + residual)` for whole rows on this thread. The product
    /// starts from `bias + residual`, so the residual joins without a pass of its own;
    /// `summed` is scratch.
    pub(super) fn apply(
        &self,
        input: &[f32],
        residual: &[f32],
        summed: &mut Vec<f32>,
        y: &mut [f32],
    ) {
        let hidden = self.hidden();
        let rows = residual.len() / hidden;
        summed.clear();
        for row in residual.chunks_exact(hidden) {
            summed.extend(row.iter().zip(&self.bias).map(|(&v, &b)| v + b));
        }
        self.dense.multiply_add_here(input, rows, summed);
        for (row, out) in summed.chunks_exact(hidden).zip(y.chunks_exact_mut(hidden)) {
            layer_norm_row_f32(row, &self.norm_weight, &self.norm_bias, self.eps, out);
        }
    }
}

/// One thread's buffers for its blocks.
#[derive(Default)]
struct BlockScratch {
    inner: Vec<f32>,
    summed: Vec<f32>,
}

impl FeedForwardOp {
    /// Rows from which the fused block is used: below, a pass has too few blocks to share out
    /// over the threads, and the layers' own kernels share every product out instead.
    pub const MIN_ROWS: usize = 4 * BLOCK_ROWS;

    fn forward(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let hidden = self.output.hidden();
        let inner = self.intermediate_bias.len();
        let consistent = self.intermediate.fits(hidden, inner)
            && self.output.fits(inner)
            && hidden > 0
            && x.len().is_multiple_of(hidden);
        if !consistent {
            candle_core::bail!(
                "bert-feed-forward: input of {} floats for {hidden} -> {inner} -> {hidden}",
                x.len()
            )
        }
        let rows = x.len() / hidden;
        let block_rows = |block: usize| block * BLOCK_ROWS..rows.min((block + 1) * BLOCK_ROWS);
        Ok(written_by_tasks(
            rows * hidden,
            rows.div_ceil(BLOCK_ROWS),
            |block| {
                let rows = block_rows(block);
                rows.start * hidden..rows.end * hidden
            },
            BlockScratch::default,
            |scratch, block, y| {
                let rows = block_rows(block);
                self.block(&x[rows.start * hidden..rows.end * hidden], y, scratch);
            },
        ))
    }

    /// The block of rows `x` (whole rows) into `y`, on this thread.
    fn block(&self, x: &[f32], y: &mut [f32], scratch: &mut BlockScratch) {
        let hidden = self.output.hidden();
        let rows = x.len() / hidden;
        let BlockScratch { inner, summed } = scratch;
        inner.resize(rows * self.intermediate_bias.len(), 0.0);
        self.intermediate
            .multiply_bias_here(x, rows, &self.intermediate_bias, inner);
        if !crate::vector_math::gelu_in_place(inner) {
            with_simd(
                #[inline(always)]
                || inner.iter_mut().for_each(|v| *v = gelu(*v)),
            );
        }
        self.output.apply(inner, x, summed, y);
    }
}

impl CustomOp1 for FeedForwardOp {
    fn name(&self) -> &'static str {
        "bert-feed-forward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match x {
            CpuStorage::F32(x) => self.forward(contiguous(x, xl, name)?)?,
            _ => candle_core::bail!("{name}: f32 input expected"),
        };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
