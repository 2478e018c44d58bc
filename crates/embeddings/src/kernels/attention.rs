//! The self-attention core over all heads at once (scores, softmax, dropout, context), with its
//! backward.

use super::*;

/// Probabilities a forward pass keeps for its backward.
#[derive(Debug)]
pub(crate) enum SavedProbs {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Scaled dot-product attention over all heads at once, for `q`, `k`, `v` laid out as the
/// projections produce them (`[batch, seq, heads * head_dim]`, contiguous): per (sequence, head),
/// `softmax(scale * q k^T + bias)`, dropout, then `@ v`, written straight into the context
/// `[batch, seq, heads * head_dim]`. No head-split copies, no transposed copies, one task per
/// (sequence, head) on rayon's pool, small GEMMs addressed by stride. The probabilities are kept
/// for the backward pass (and for callers that ask for them); the backward recomputes nothing
/// else and returns the gradients of `q`, `k` and `v`.
#[derive(Debug)]
pub(crate) struct AttentionOp {
    pub heads: usize,
    pub scale: f64,
    /// `[batch, keys]` additive mask, shared by every head and query of a sequence.
    pub bias: Option<Vec<f32>>,
    /// Keep-mask over `[batch, heads, queries, keys]` and its `1 / (1 - p)` scale.
    pub dropout: Option<(Vec<bool>, f64)>,
    /// Keep the probabilities (for a backward pass or a caller that asked for them). Without,
    /// each task softmaxes in a per-thread scratch row block: inference never holds the
    /// `[batch, heads, seq, seq]` tensor (100 MB at 8 x 512 for 12 heads).
    pub keep_probs: bool,
    /// Packed, padding-free rows (`[1, tokens, ..]`): sequence `i` is rows `starts[i] ..
    /// starts[i + 1]`, and attends to its own rows only. Inference only: no bias, dropout or
    /// kept probabilities with it.
    pub starts: Option<Arc<[usize]>>,
    saved: SavedAttention,
}

/// A handle on the probabilities an [`AttentionOp`] keeps, shared with its caller (candle owns
/// the op once it is applied).
#[derive(Debug, Clone, Default)]
pub(crate) struct SavedAttention(Arc<std::sync::Mutex<Option<SavedProbs>>>);

impl SavedAttention {
    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<SavedProbs>>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))
    }

    /// The probabilities of the op's forward pass, `[batch, heads, queries, keys]`.
    pub fn probabilities(
        &self,
        shape: (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        match self.lock()?.as_ref() {
            Some(SavedProbs::F32(p)) => Tensor::from_slice(p, shape, &candle_core::Device::Cpu),
            Some(SavedProbs::F64(p)) => Tensor::from_slice(p, shape, &candle_core::Device::Cpu),
            None => candle_core::bail!("attention probabilities requested before a forward pass"),
        }
    }
}

/// A pointer that parallel tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: used only for disjoint per-task regions of one buffer (see AttentionOp,
// `team::parallel_chunks_mut`, the panel product).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// `dst (m x n) = lhs (m x k) @ rhs (k x n)`, every operand given by pointer and (row, column)
/// strides; `accumulate` adds onto `dst` instead of overwriting it.
///
/// # Safety
/// The pointers must cover the strided extents, and `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn small_gemm<T: WithDType + 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const T,
    rhs_rs: isize,
    rhs_cs: isize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        T::zero(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

impl AttentionOp {
    pub fn new(
        heads: usize,
        scale: f64,
        bias: Option<Vec<f32>>,
        dropout: Option<(Vec<bool>, f64)>,
        keep_probs: bool,
    ) -> (Self, SavedAttention) {
        let saved = SavedAttention::default();
        let op = Self {
            heads,
            scale,
            bias,
            dropout,
            keep_probs,
            starts: None,
            saved: saved.clone(),
        };
        (op, saved)
    }

    /// The op over packed rows (see [`AttentionOp::starts`]).
    pub fn with_starts(mut self, starts: Arc<[usize]>) -> Self {
        self.starts = Some(starts);
        self
    }

    /// Number of sequences of a `[batch, seq, ..]` input: `batch`, or as many as packed.
    fn sequences(&self, batch: usize) -> usize {
        self.starts.as_ref().map_or(batch, |s| s.len() - 1)
    }

    /// `(first row, length)` of sequence `b` of a `[batch, seq, ..]` input.
    fn span(&self, b: usize, seq: usize) -> (usize, usize) {
        match &self.starts {
            Some(s) => (s[b], s[b + 1] - s[b]),
            None => (b * seq, seq),
        }
    }

    /// `q`, `k` and `v` hold rows of `ld` elements, of which the first `hidden` are used: `ld`
    /// is `hidden` for separate projections, `3 * hidden` for the packed output of one QKV
    /// projection (then `k` and `v` start `hidden` and `2 * hidden` elements in).
    #[allow(clippy::too_many_arguments)]
    fn forward<T: Real + Default + 'static>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        ld: usize,
        batch: usize,
        seq: usize,
        hidden: usize,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let heads = self.heads;
        let d = hidden / heads;
        let sequences = self.sequences(batch);
        let mut context = filled(batch * seq * hidden, T::zero());
        let mut probs = self
            .keep_probs
            .then(|| filled(batch * heads * seq * seq, T::zero()));
        let ctx_ptr = SharedMut(context.as_mut_ptr());
        let probs_ptr = probs.as_mut().map(|p| SharedMut(p.as_mut_ptr()));
        let scale = T::from_f64(self.scale);
        // Inference (no dropout, probabilities not kept) in f32 divides the `P V` rows by the
        // softmax sums instead of the probability rows: head size (32) wide, not sequence wide.
        let divide_after = self.dropout.is_none() && probs_ptr.is_none();
        #[cfg(target_arch = "x86_64")]
        if divide_after && crate::tiled_attention::supports(d) {
            if let (Some(q), Some(k), Some(v)) = (as_f32(q), as_f32(k), as_f32(v)) {
                let scale = self.scale as f32;
                let init = crate::tiled_attention::HeadScratch::default;
                crate::team::parallel_for_init(sequences * heads, init, |scratch, task| {
                    let (b, h) = (task / heads, task % heads);
                    let (start, seq) = self.span(b, seq);
                    let base = start * ld + h * d;
                    let bias = self.bias.as_ref().map(|bias| &bias[start..start + seq]);
                    // SAFETY: supported (checked above); q, k and v hold `seq` rows of stride
                    // `ld` from `base` on, and this task alone writes its sequence's context
                    // rows, columns h*d..(h+1)*d, a buffer apart from the inputs.
                    unsafe {
                        crate::tiled_attention::attention_head(
                            q[base..].as_ptr(),
                            k[base..].as_ptr(),
                            v[base..].as_ptr(),
                            ld,
                            seq,
                            d,
                            scale,
                            bias,
                            ctx_ptr.get().add(start * hidden + h * d).cast::<f32>(),
                            hidden,
                            scratch,
                        );
                    }
                });
                return (context, probs);
            }
        }
        let init = || (Vec::new(), Vec::new());
        crate::team::parallel_for_init(sequences * heads, init, |state, task| {
            let (scratch, sums): &mut (Vec<T>, Vec<f32>) = state;
            // Kept probabilities and dropout come only with the padded layout (`check`), so
            // their per-task blocks of seq * seq below are this task's.
            let (start, seq) = self.span(task / heads, seq);
            // This task's (seq x seq) probabilities: its block of the kept tensor, or the
            // thread's scratch.
            let p: &mut [T] = match probs_ptr {
                // SAFETY: task blocks of seq * seq elements are disjoint and in bounds.
                Some(ptr) => unsafe {
                    std::slice::from_raw_parts_mut(ptr.get().add(task * seq * seq), seq * seq)
                },
                None => {
                    scratch.resize(seq * seq, T::zero());
                    scratch
                }
            };
            with_simd(
                #[inline(always)]
                || {
                    let h = task % heads;
                    let base = start * ld + h * d;
                    // SAFETY: q, k (rows of stride `ld`) and p (seq x seq) are in bounds.
                    unsafe {
                        small_gemm(
                            seq,
                            seq,
                            d,
                            p.as_mut_ptr(),
                            seq,
                            q[base..].as_ptr(),
                            ld as isize,
                            1,
                            k[base..].as_ptr(),
                            1,
                            ld as isize,
                        );
                    }
                    let row_bias = self.bias.as_ref().map(|bias| &bias[start..start + seq]);
                    sums.clear();
                    if let Some(p32) = as_f32_mut(p) {
                        let scale = self.scale as f32;
                        for row in p32.chunks_exact_mut(seq) {
                            if divide_after {
                                sums.push(crate::vector_math::scaled_exp_row(row, scale, row_bias));
                            } else {
                                crate::vector_math::scaled_softmax(row, scale, row_bias);
                            }
                        }
                    } else {
                        let bias: Option<Vec<T>> = row_bias
                            .map(|bias| bias.iter().map(|&v| T::from_f64(v as f64)).collect());
                        for row in p.chunks_exact_mut(seq) {
                            scaled_softmax_in_place(row, scale, bias.as_deref());
                        }
                    }
                    let dropped;
                    let weights: &[T] = match &self.dropout {
                        Some((keep, keep_scale)) => {
                            let keep = &keep[task * seq * seq..(task + 1) * seq * seq];
                            let keep_scale = T::from_f64(*keep_scale);
                            dropped = p
                                .iter()
                                .zip(keep)
                                .map(|(&x, &kept)| if kept { x * keep_scale } else { T::zero() })
                                .collect::<Vec<T>>();
                            &dropped
                        }
                        None => p,
                    };
                    // SAFETY: this task alone writes its sequence's context rows, columns
                    // h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            ctx_ptr.get().add(start * hidden + h * d),
                            hidden,
                            weights.as_ptr(),
                            seq as isize,
                            1,
                            v[base..].as_ptr(),
                            ld as isize,
                            1,
                        );
                    }
                    // `sums` is filled only in the f32 case, where T is f32.
                    for (r, &sum) in sums.iter().enumerate() {
                        // SAFETY: this task's context row r, columns h*d..(h+1)*d, as above.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(
                                ctx_ptr
                                    .get()
                                    .add((start + r) * hidden + h * d)
                                    .cast::<f32>(),
                                d,
                            )
                        };
                        crate::vector_math::scale_row(row, 1.0 / sum);
                    }
                },
            )
        });
        (context, probs)
    }

    /// Gradients of `q`, `k`, `v` from that of the context, packed `[3, batch, seq, hidden]`.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real + Default + 'static>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        probs: &[T],
        dctx: &[T],
        batch: usize,
        seq: usize,
        hidden: usize,
    ) -> Vec<T> {
        let heads = self.heads;
        let d = hidden / heads;
        let size = batch * seq * hidden;
        let mut grads = filled(3 * size, T::zero());
        let out = SharedMut(grads.as_mut_ptr());
        let scale = T::from_f64(self.scale);
        (0..batch * heads).into_par_iter().for_each(|task| {
            with_simd(
                #[inline(always)]
                || {
                    let (b, h) = (task / heads, task % heads);
                    let base = b * seq * hidden + h * d;
                    let p = &probs[task * seq * seq..(task + 1) * seq * seq];
                    let mut dp = filled(seq * seq, T::zero());
                    // dP_dropped = dctx @ v^T.
                    // SAFETY: strided reads in bounds; dp is this task's own buffer.
                    unsafe {
                        small_gemm(
                            seq,
                            seq,
                            d,
                            dp.as_mut_ptr(),
                            seq,
                            dctx[base..].as_ptr(),
                            hidden as isize,
                            1,
                            v[base..].as_ptr(),
                            1,
                            hidden as isize,
                        );
                    }
                    // The weights the forward multiplied v by (dropped probabilities), and dP.
                    let weights: Vec<T> = match &self.dropout {
                        Some((keep, keep_scale)) => {
                            let keep = &keep[task * seq * seq..(task + 1) * seq * seq];
                            let keep_scale = T::from_f64(*keep_scale);
                            for (g, &kept) in dp.iter_mut().zip(keep) {
                                *g = if kept { *g * keep_scale } else { T::zero() };
                            }
                            p.iter()
                                .zip(keep)
                                .map(|(&x, &kept)| if kept { x * keep_scale } else { T::zero() })
                                .collect()
                        }
                        None => p.to_vec(),
                    };
                    // dv = weights^T @ dctx.
                    // SAFETY: this task alone writes dv rows b, columns h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(2 * size + base),
                            hidden,
                            weights.as_ptr(),
                            1,
                            seq as isize,
                            dctx[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                    }
                    // dS = scale * P * (dP - rowsum(dP * P)), in place in dp.
                    for i in 0..seq {
                        let (prow, grow) =
                            (&p[i * seq..(i + 1) * seq], &mut dp[i * seq..(i + 1) * seq]);
                        let dot = dot(prow, grow);
                        for (g, &a) in grow.iter_mut().zip(prow) {
                            *g = scale * a * (*g - dot);
                        }
                    }
                    // dq = dS @ k, dk = dS^T @ q.
                    // SAFETY: this task alone writes dq and dk rows b, columns h*d..(h+1)*d.
                    unsafe {
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(base),
                            hidden,
                            dp.as_ptr(),
                            seq as isize,
                            1,
                            k[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                        small_gemm(
                            seq,
                            d,
                            seq,
                            out.get().add(size + base),
                            hidden,
                            dp.as_ptr(),
                            1,
                            seq as isize,
                            q[base..].as_ptr(),
                            hidden as isize,
                            1,
                        );
                    }
                },
            )
        });
        grads
    }

    fn check(
        &self,
        q: &Layout,
        k: &Layout,
        v: &Layout,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let (batch, seq, hidden) = q.shape().dims3()?;
        if k.dims() != q.dims() || v.dims() != q.dims() || hidden % self.heads != 0 {
            candle_core::bail!(
                "bert-attention: q {:?}, k {:?}, v {:?} with {} heads",
                q.dims(),
                k.dims(),
                v.dims(),
                self.heads
            )
        }
        if self.bias.as_ref().is_some_and(|b| b.len() != batch * seq)
            || self
                .dropout
                .as_ref()
                .is_some_and(|(m, _)| m.len() != batch * self.heads * seq * seq)
        {
            candle_core::bail!(
                "bert-attention: bias or dropout mask does not fit {:?}",
                q.dims()
            )
        }
        self.check_starts(batch * seq)?;
        Ok((batch, seq, hidden))
    }

    /// Packed rows (if any) must cover the `rows` of the input in runs of at least one, and
    /// come without a bias, dropout or kept probabilities.
    fn check_starts(&self, rows: usize) -> candle_core::Result<()> {
        let Some(starts) = &self.starts else {
            return Ok(());
        };
        if !starts_cover(starts, rows) {
            candle_core::bail!("bert-attention: sequence starts do not cover {rows} rows")
        }
        if self.bias.is_some() || self.dropout.is_some() || self.keep_probs {
            candle_core::bail!(
                "bert-attention: packed rows take no bias, dropout or kept probabilities"
            )
        }
        Ok(())
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "bert-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, seq, hidden) = self.check(ql, kl, vl)?;
        let name = self.name();
        let mut saved = self.saved.lock()?;
        let out = per_float!(name, [F32, F64], (q => q @ ql, k => k @ kl, v => v @ vl), {
            let (context, probs) = self.forward(q, k, v, hidden, batch, seq, hidden);
            *saved = probs.map(Real::save);
            context
        });
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, seq, hidden) = self.check(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let saved = self.saved.lock()?;
        let (qs, _) = q.storage_and_layout();
        let (ks, _) = k.storage_and_layout();
        let (vs, _) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let name = self.name();
        let (qc, kc, vc, gc) = (
            cpu_storage(&qs, name)?,
            cpu_storage(&ks, name)?,
            cpu_storage(&vs, name)?,
            cpu_storage(&gs, name)?,
        );
        let probs = saved
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: backward before forward")))?;
        let grads = per_float!(
            name,
            [F32, F64],
            (qc => qd @ q.layout(), kc => kd @ k.layout(), vc => vd @ v.layout(), gc => gd @ gl),
            {
                let p = Real::saved(probs).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: backward in another dtype"))
                })?;
                self.backward(qd, kd, vd, p, gd, batch, seq, hidden)
            }
        );
        let shape = (3, batch, seq, hidden);
        let packed = match grads {
            CpuStorage::F32(g) => Tensor::from_vec(g, shape, q.device())?,
            CpuStorage::F64(g) => Tensor::from_vec(g, shape, q.device())?,
            _ => candle_core::bail!("{name}: f32 or f64 expected"),
        };
        let pick = |i: usize, t: &Tensor| -> candle_core::Result<Option<Tensor>> {
            t.track_op().then(|| packed.get(i)).transpose()
        };
        Ok((pick(0, q)?, pick(1, k)?, pick(2, v)?))
    }
}

/// Inference attention over the packed output of one QKV projection, `[batch, seq, 3 * hidden]`
/// (query, key and value columns side by side, as `BertSelfAttention`'s fused projection
/// writes them): the same computation as [`AttentionOp`], reading the three blocks in place.
/// No dropout and no backward: it is built only for inference.
#[derive(Debug)]
pub(crate) struct PackedAttentionOp(pub AttentionOp);

impl CustomOp1 for PackedAttentionOp {
    fn name(&self) -> &'static str {
        "bert-attention-packed"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let op = &self.0;
        let (batch, seq, packed) = xl.shape().dims3()?;
        let hidden = packed / 3;
        if packed % 3 != 0 || hidden % op.heads != 0 || op.dropout.is_some() {
            candle_core::bail!(
                "{name}: {:?} is not [batch, seq, 3 x heads x d] (or has dropout)",
                xl.dims()
            )
        }
        if op.bias.as_ref().is_some_and(|b| b.len() != batch * seq) {
            candle_core::bail!("{name}: bias does not fit {:?}", xl.dims())
        }
        op.check_starts(batch * seq)?;
        let mut saved = op.saved.lock()?;
        let out = per_float!(name, [F32, F64], (x => x @ xl), {
            let (context, probs) =
                op.forward(x, &x[hidden..], &x[2 * hidden..], packed, batch, seq, hidden);
            *saved = probs.map(Real::save);
            context
        });
        Ok((out, Shape::from((batch, seq, hidden))))
    }
}
