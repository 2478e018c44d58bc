//! GELU with the exact normal CDF (HF's `gelu`), with its backward.

use super::*;

/// `x * Phi(x)` with the exact normal CDF (`0.5 * (1 + erf(x / sqrt 2))`), HF's `gelu`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GeluErfOp;

pub(super) const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
pub(super) const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline(always)]
pub(super) fn gelu<T: Real>(v: T) -> T {
    let half = T::from_f64(0.5);
    v * half * (T::one() + (v * T::from_f64(FRAC_1_SQRT_2)).erf())
}

/// d gelu / dx = Phi(x) + x phi(x).
#[inline(always)]
pub(super) fn gelu_grad<T: Real>(v: T) -> T {
    let half = T::from_f64(0.5);
    let cdf = half * (T::one() + (v * T::from_f64(FRAC_1_SQRT_2)).erf());
    let pdf = T::from_f64(FRAC_1_SQRT_2PI) * (-(v * v) * half).exp_fast();
    cdf + v * pdf
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "bert-gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = per_float!(name, [F32, F64], (x => x @ xl), map_elements(x, x, #[inline(always)] |v, _| gelu(v)));
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBackward)?,
        ))
    }
}

struct GeluErfBackward;

impl CustomOp2 for GeluErfBackward {
    fn name(&self) -> &'static str {
        "bert-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        // map_elements pairs elements up to the shorter input: the shapes must agree.
        if xl.dims() != dyl.dims() {
            candle_core::bail!("{name}: x {:?} with gradient {:?}", xl.dims(), dyl.dims())
        }
        let out = per_float!(name, [F32, F64], (x => x @ xl, dy => dy @ dyl), map_elements(x, dy, #[inline(always)] |v, g| gelu_grad(v) * g));
        Ok((out, xl.shape().clone()))
    }
}
