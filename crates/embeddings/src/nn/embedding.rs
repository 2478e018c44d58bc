//! The lookup table (`nn.Embedding`).

use super::*;

/// A lookup table (`nn.Embedding`).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Wraps a `[rows, dim]` table.
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// Loads `weight` of shape `[rows, dim]` under `vb`.
    pub fn load(rows: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self::new(vb.get((rows, dim), "weight")?))
    }

    /// The `[rows, dim]` table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        if self.weight.device().is_cpu()
            && matches!(self.weight.dtype(), DType::F32 | DType::F64)
            && matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64)
        {
            return self
                .weight
                .contiguous()?
                .apply_op2(&ids.contiguous()?, crate::kernels::EmbeddingOp);
        }
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(self.weight.dim(1)?);
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(out_dims)
    }
}
