//! The embedding lookup (row gather), with its backward.

use super::*;

/// Row gather `table[ids]` for a `[rows, dim]` table and contiguous integer `ids` of any shape
/// (output `[ids.., dim]`). Its backward writes the table's gradient in one pass: a zeroed
/// buffer (fresh pages, so only the rows the batch touched are ever written) with each
/// gradient row added onto its id's row. candle's `index_select` backward zero-fills a tensor
/// and then copies it into a second one for `index_add`: for a 30k-row vocabulary that was two
/// 47 MB buffers written, page by page, every training step.
///
/// Ids must be in range: the caller checks them (they are user input) before this runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbeddingOp;

/// Ids of any integer storage as row indices, or an error naming the first out of `0..rows`.
fn row_indices(ids: &CpuStorage, layout: &Layout, rows: usize) -> candle_core::Result<Vec<usize>> {
    let name = "bert-embedding";
    fn to_rows<I: Copy>(
        ids: &[I],
        rows: usize,
        index: impl Fn(I) -> Option<usize>,
    ) -> candle_core::Result<Vec<usize>> {
        ids.iter()
            .map(|&id| match index(id) {
                Some(r) if r < rows => Ok(r),
                _ => candle_core::bail!("bert-embedding: id outside the table of {rows} rows"),
            })
            .collect()
    }
    match ids {
        CpuStorage::U32(v) => to_rows(contiguous(v, layout, name)?, rows, |i| Some(i as usize)),
        CpuStorage::U8(v) => to_rows(contiguous(v, layout, name)?, rows, |i| Some(i as usize)),
        CpuStorage::I64(v) => to_rows(contiguous(v, layout, name)?, rows, |i| {
            usize::try_from(i).ok()
        }),
        _ => candle_core::bail!("{name}: ids must be u8, u32 or i64"),
    }
}

fn table_dims(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match layout.dims() {
        [rows, dim] => Ok((*rows, *dim)),
        other => candle_core::bail!("bert-embedding: the table must be [rows, dim], got {other:?}"),
    }
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "bert-embedding"
    }

    fn cpu_fwd(
        &self,
        table: &CpuStorage,
        tl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = table_dims(tl)?;
        let index = row_indices(ids, il, rows)?;
        let name = self.name();
        let out = per_float!(name, [F32, F64], (table => table @ tl), {
            for_rows(index.len(), dim, |r, out| {
                let at = index[r] * dim;
                out.copy_from_slice(&table[at..at + dim]);
            })
        });
        let mut dims = il.dims().to_vec();
        dims.push(dim);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !table.track_op() {
            // A frozen table (LoRA, head-only training) needs no 47 MB gradient.
            return Ok((None, None));
        }
        let grad = grad.contiguous()?;
        let ids = ids.contiguous()?;
        Ok((
            Some(grad.apply_op2_no_bwd(&ids, &EmbeddingBackward(table.dims2()?))?),
            None,
        ))
    }
}

/// The table gradient of [`EmbeddingOp`]: `[rows, dim]`, zero but for the looked-up rows.
struct EmbeddingBackward((usize, usize));

impl EmbeddingBackward {
    fn scatter<T: Real + Default>(&self, grad: &[T], index: &[usize]) -> Vec<T> {
        let (rows, dim) = self.0;
        // `vec![zero; n]` is calloc: untouched rows stay on never-written pages. A row's first
        // gradient is copied, not added: a read first would map the shared zero page, and the
        // write after it would fault again and flush the TLB of every core.
        let mut out = vec![T::zero(); rows * dim];
        let mut written = vec![false; rows];
        // Sequential: duplicate ids add into one row, and a batch holds a few thousand rows
        // against the table's tens of thousands, so this is a small part of the cost.
        for (r, &row) in index.iter().enumerate() {
            let dst = &mut out[row * dim..(row + 1) * dim];
            let src = &grad[r * dim..(r + 1) * dim];
            if std::mem::replace(&mut written[row], true) {
                dst.iter_mut().zip(src).for_each(|(d, &g)| *d += g);
            } else {
                dst.copy_from_slice(src);
            }
        }
        out
    }
}

impl CustomOp2 for EmbeddingBackward {
    fn name(&self) -> &'static str {
        "bert-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        grad: &CpuStorage,
        gl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = self.0;
        let index = row_indices(ids, il, rows)?;
        if gl.shape().elem_count() != index.len() * dim {
            candle_core::bail!(
                "{}: gradient {:?} for {} ids of dim {dim}",
                self.name(),
                gl.dims(),
                index.len()
            )
        }
        let name = self.name();
        let out = per_float!(name, [F32, F64], (grad => grad @ gl), self.scatter(grad, &index));
        Ok((out, Shape::from((rows, dim))))
    }
}
