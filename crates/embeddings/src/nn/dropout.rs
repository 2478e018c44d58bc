//! Dropout (`nn.Dropout`) and the seeded generator behind its masks (and the harness's shuffles and
//! initialisation).

use super::*;

/// Inverted dropout that drops only when `train` is set (HF's `nn.Dropout` in train mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub(super) p: f32,
}

impl Dropout {
    /// A dropout layer with drop probability `p` in [0, 1).
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::input(format!(
                "dropout probability must be in [0, 1), got {p}"
            )));
        }
        Ok(Self { p: p as f32 })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)` when
    /// training; the identity otherwise. Masks come from this thread's seeded dropout stream
    /// ([`seed_dropout`]), so a training run is reproducible and resumable.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let scale = 1.0 / (1.0 - self.p);
        // On CUDA the mask is drawn on the device, from this thread's stream (see
        // `cuda_epilogues::dropout_mask`): the same flags, without drawing them here and copying
        // them over (a bert-base step's attention masks alone are ~40M draws).
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            let state = take_draws(x.elem_count());
            let mask = crate::cuda_epilogues::dropout_mask(x, state, self.p, scale)?;
            return x.mul(&mask);
        }
        let keep = self.draw_keep(x.elem_count());
        // On the CPU one kernel applies the mask forward and backward; elsewhere a mask tensor.
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            return x.contiguous()?.apply_op1(crate::kernels::DropoutOp {
                keep: std::sync::Arc::new(keep),
                scale: scale as f64,
            });
        }
        let mask: Vec<f32> = keep
            .into_iter()
            .map(|k| if k { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

impl Dropout {
    /// `n` keep flags from this thread's seeded dropout stream (true with probability `1 - p`).
    pub(super) fn draw_keep(&self, n: usize) -> Vec<bool> {
        DROPOUT_RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            (0..n).map(|_| rng.next_f32() >= self.p).collect()
        })
    }
}

/// SplitMix64: a small, fast, well-mixed generator whose whole state is one `u64`, so runs that
/// use it (dropout, initialisation, shuffling) are reproducible from a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// What each draw adds to the state (the golden ratio's 64-bit fraction); the CUDA
    /// dropout kernel (`cuda/epilogues.cu`) uses the same constant.
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Moves the stream past `n` draws without making them (each draw adds the same
    /// constant to the state, so draw `k` after this is draw `n + k` before it).
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(Self::GAMMA));
    }

    /// Uniform in [0, 1) with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, 1) with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniform index in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

thread_local! {
    static DROPOUT_RNG: std::cell::RefCell<SplitMix64> = const { std::cell::RefCell::new(SplitMix64(0)) };
}

/// This thread's dropout stream state before `n` draws, the stream moved past them: a device
/// that draws the `n` flags itself starts from the returned state.
#[cfg(feature = "cuda")]
fn take_draws(n: usize) -> u64 {
    DROPOUT_RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        let state = rng.0;
        rng.skip(n as u64);
        state
    })
}

/// Seeds the dropout masks drawn on this thread. A trainer calls it at every step with a value
/// derived from its seed and the step, so masks depend only on (seed, step): a resumed run
/// draws exactly the masks the uninterrupted one would have.
pub fn seed_dropout(seed: u64) {
    DROPOUT_RNG.with(|rng| *rng.borrow_mut() = SplitMix64(seed));
}
