//! AdamW with per-parameter weight decay, the linear warm-up/decay schedule, and gradient
//! clipping by global norm: the recipe of transformers' Trainer and sentence-transformers'
//! `CrossEncoder.fit`.

use std::collections::HashMap;

use std::sync::{Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::trainable::Param;

/// AdamW hyper-parameters (PyTorch's defaults, decay 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to weights but not biases or LayerNorm parameters.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// PyTorch's `torch.optim.AdamW`, one moment pair per trained variable.
///
/// f32 variables on the CPU, and on CUDA in a build with the `cuda` feature, are updated by one
/// in-place kernel per variable (decay, moments, bias-corrected step, the clipping scale folded
/// in), with the moments beside them in host or device memory; other dtypes and devices use
/// tensor ops. All follow PyTorch's arithmetic order.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var, bool)>,
    moments: Vec<Moments>,
    step: u64,
}

/// First and second moments of one variable.
#[derive(Debug)]
enum Moments {
    /// f32 variables on the CPU: plain vectors the update kernel writes in place.
    Host { first: Vec<f32>, second: Vec<f32> },
    /// f32 variables on CUDA: device buffers the update kernel writes in place.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda_adamw::DeviceMoments),
    /// Anything else: f32 tensors on the variable's device.
    Tensors { first: Tensor, second: Tensor },
}

impl Moments {
    fn zeros(var: &Var) -> candle_core::Result<Self> {
        if var.device().is_cpu() && var.dtype() == DType::F32 {
            let n = var.elem_count();
            return Ok(Self::Host {
                first: vec![0.0; n],
                second: vec![0.0; n],
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(moments) = crate::cuda_adamw::DeviceMoments::zeros(var)? {
            return Ok(Self::Cuda(moments));
        }
        let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
        Ok(Self::Tensors {
            first: zeros.clone(),
            second: zeros,
        })
    }

    fn tensors(&self, var: &Var) -> candle_core::Result<(Tensor, Tensor)> {
        match self {
            Self::Host { first, second } => Ok((
                Tensor::from_slice(first, var.shape(), var.device())?,
                Tensor::from_slice(second, var.shape(), var.device())?,
            )),
            #[cfg(feature = "cuda")]
            Self::Cuda(moments) => moments.tensors(var),
            Self::Tensors { first, second } => Ok((first.clone(), second.clone())),
        }
    }

    fn restore(&mut self, var: &Var, first: &Tensor, second: &Tensor) -> candle_core::Result<()> {
        let check = |t: &Tensor| -> candle_core::Result<Tensor> {
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "moment shape {:?} for a {:?} variable",
                    t.dims(),
                    var.dims()
                )
            }
            t.to_dtype(DType::F32)?.to_device(var.device())
        };
        let (first, second) = (check(first)?, check(second)?);
        *self = match self {
            Self::Host { .. } => Self::Host {
                first: first.flatten_all()?.to_vec1()?,
                second: second.flatten_all()?.to_vec1()?,
            },
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => Self::Cuda(crate::cuda_adamw::DeviceMoments::from_tensors(
                &first, &second,
            )?),
            Self::Tensors { .. } => Self::Tensors { first, second },
        };
        Ok(())
    }
}

impl AdamW {
    /// An optimiser over the trained parameters of `params` (frozen ones are skipped).
    pub fn new(params: &[Param], config: AdamWConfig) -> Result<Self> {
        let params: Vec<(String, Var, bool)> = params
            .iter()
            .filter_map(|p| p.var.clone().map(|v| (p.name.clone(), v, p.decay)))
            .collect();
        if params.is_empty() {
            return Err(Error::Setting(
                "nothing to train: every parameter is frozen".into(),
            ));
        }
        let moments = params
            .iter()
            .map(|(_, v, _)| Moments::zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config,
            params,
            moments,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from `grads`. Parameters without a gradient (unused
    /// in this batch) are left alone, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first (the clipping factor
    /// of [`clip_scale`]), without materialising the scaled gradients.
    pub fn step_scaled(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var, decay)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let decay = if *decay { c.weight_decay } else { 0.0 };
            let scalars = AdamWScalars {
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                // 1 - beta in f64 first: 1 - 0.999f32 is 1.3e-5 off 0.001.
                one_minus_beta1: (1.0 - c.beta1) as f32,
                one_minus_beta2: (1.0 - c.beta2) as f32,
                eps: c.eps as f32,
                keep: (1.0 - lr * decay) as f32,
                step_size: (lr / bias1) as f32,
                bias2_sqrt: bias2.sqrt() as f32,
                grad_scale: grad_scale as f32,
            };
            match &mut self.moments[i] {
                Moments::Host { first, second } => {
                    let kernel = AdamWKernel {
                        first: Mutex::new(first),
                        second: Mutex::new(second),
                        scalars,
                    };
                    var.as_tensor()
                        .inplace_op2(&grad.to_dtype(DType::F32)?.contiguous()?, &kernel)?;
                }
                #[cfg(feature = "cuda")]
                Moments::Cuda(moments) => moments.step(var, grad, scalars)?,
                Moments::Tensors { first, second } => {
                    // PyTorch's order: decay, moments, bias-corrected step.
                    let mut grad = grad.to_dtype(DType::F32)?;
                    if grad_scale != 1.0 {
                        grad = (grad * grad_scale)?;
                    }
                    let m = ((&*first * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
                    let v = ((&*second * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
                    let theta = (var.as_tensor().to_dtype(DType::F32)? * (1.0 - lr * decay))?;
                    let theta = (theta - ((&m / denom)? * (lr / bias1))?)?;
                    var.set(&theta.to_dtype(var.dtype())?)?;
                    *first = m;
                    *second = v;
                }
            }
        }
        Ok(())
    }

    /// The moments by `m.NAME` / `v.NAME`, for a training-state checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            let (first, second) = self.moments[i].tensors(var)?;
            state.insert(format!("m.{name}"), first);
            state.insert(format!("v.{name}"), second);
        }
        Ok(state)
    }

    /// Restores moments and the step count saved by [`AdamW::state`].
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            let get = |key: String| {
                state
                    .get(&key)
                    .ok_or_else(|| Error::Setting(format!("optimizer state lacks {key}")))
            };
            let (first, second) = (get(format!("m.{name}"))?, get(format!("v.{name}"))?);
            self.moments[i].restore(var, first, second)?;
        }
        self.step = step;
        Ok(())
    }
}

/// The numbers one AdamW update of one variable uses, in f32 as the kernels compute. Laid out
/// as the CUDA kernel's `Scalars` (src/cuda/adamw.cu), which takes it by value.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct AdamWScalars {
    pub beta1: f32,
    pub beta2: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub keep: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
    /// The clipping factor the gradient is multiplied by first.
    pub grad_scale: f32,
}

/// The in-place AdamW update of one f32 variable, PyTorch's arithmetic:
/// `g *= scale; theta *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// theta -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. The moments `M` are host
/// vectors for the CPU kernel below, device buffers for the CUDA one (`cuda_adamw`).
pub(crate) struct AdamWKernel<'a, M> {
    pub first: Mutex<&'a mut M>,
    pub second: Mutex<&'a mut M>,
    pub scalars: AdamWScalars,
}

/// A moment buffer's count of values.
pub(crate) trait MomentBuffer {
    fn values(&self) -> usize;
}

impl MomentBuffer for Vec<f32> {
    fn values(&self) -> usize {
        self.len()
    }
}

/// The variable's and the gradient's element ranges, and both moments, locked.
type Checked<'g, 'a, M> = (
    std::ops::Range<usize>,
    std::ops::Range<usize>,
    MutexGuard<'g, &'a mut M>,
    MutexGuard<'g, &'a mut M>,
);

impl<'a, M: MomentBuffer> AdamWKernel<'a, M> {
    /// The variable's and the gradient's element ranges (both layouts contiguous) and both
    /// moments, locked, once all four hold as many values; `name` is the kernel's, for errors.
    pub(crate) fn checked(
        &self,
        name: &str,
        theta_layout: &Layout,
        grad_layout: &Layout,
    ) -> candle_core::Result<Checked<'_, 'a, M>> {
        let (Some((t0, t1)), Some((g0, g1))) = (
            theta_layout.contiguous_offsets(),
            grad_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("{name}: contiguous variable and gradient expected")
        };
        let poisoned = |_| candle_core::Error::Msg(format!("{name}: a moment's lock was poisoned"));
        let first = self.first.lock().map_err(poisoned)?;
        let second = self.second.lock().map_err(poisoned)?;
        let n = t1 - t0;
        if g1 - g0 != n || first.values() != n || second.values() != n {
            candle_core::bail!("{name}: moments, gradient and variable sizes differ")
        }
        Ok((t0..t1, g0..g1, first, second))
    }
}

impl InplaceOp2 for AdamWKernel<'_, Vec<f32>> {
    fn name(&self) -> &'static str {
        "bert-adamw"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(grad)) = (theta, grad) else {
            candle_core::bail!("{}: f32 variable and gradient expected", self.name())
        };
        let (t, g, mut first, mut second) = self.checked(self.name(), theta_layout, grad_layout)?;
        let (theta, grad) = (&mut theta[t], &grad[g]);
        const CHUNK: usize = 1 << 14;
        let s = &self.scalars;
        theta
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(first.par_chunks_mut(CHUNK))
            .zip(second.par_chunks_mut(CHUNK))
            .for_each(|(((theta, grad), m), v)| {
                for j in 0..theta.len() {
                    let g = grad[j] * s.grad_scale;
                    theta[j] *= s.keep;
                    m[j] = s.beta1 * m[j] + s.one_minus_beta1 * g;
                    v[j] = s.beta2 * v[j] + s.one_minus_beta2 * g * g;
                    let denom = v[j].sqrt() / s.bias2_sqrt + s.eps;
                    theta[j] -= s.step_size * (m[j] / denom);
                }
            });
        Ok(())
    }
}

/// AdamW on `device` against AdamW on the CPU, for a device check (`bert selftest`): three
/// updates (weight decay on, the second with a clipping scale) of one f32 variable of 1000
/// values from the same gradients; returns the largest |difference| of the variable after
/// them. A CUDA build updates f32 variables with its own kernel, which rounds each operation
/// as the CPU's kernel does: 0 there.
pub fn device_agreement(device: &candle_core::Device) -> Result<f64> {
    let cpu = candle_core::Device::Cpu;
    let values: Vec<f32> = (0..1000)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let updated = |device: &candle_core::Device| -> Result<Tensor> {
        let var = Var::from_vec(values.clone(), values.len(), device)?;
        let param = Param {
            name: "w".into(),
            var: Some(var.clone()),
            tensor: var.as_tensor().clone(),
            decay: true,
            fresh: false,
        };
        let mut optimizer = AdamW::new(&[param], AdamWConfig::default())?;
        for (step, scale) in [1.0, 0.5, 1.0].into_iter().enumerate() {
            // d(sum(var * g))/dvar = g, a different g each step.
            let g: Vec<f32> = (0..values.len())
                .map(|i| (((i + 7 * step) * 13) % 29) as f32 / 29.0 - 0.4)
                .collect();
            let g = Tensor::from_vec(g, values.len(), device)?;
            let grads = (var.as_tensor() * g)?.sum_all()?.backward()?;
            optimizer.step_scaled(&grads, 1e-3, scale)?;
        }
        Ok(var.as_tensor().to_device(&cpu)?)
    };
    let difference = (updated(device)? - updated(&cpu)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    Ok(f64::from(difference))
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total`
/// (transformers' `get_linear_schedule_with_warmup`).
pub fn linear_schedule(peak: f64, warmup: u64, total: u64, step: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    peak * (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

/// The global L2 norm of the gradients of `vars` (those that have one), accumulated in f64.
/// On the CPU it reads the gradients where they are, without temporaries; elsewhere each
/// gradient's sum of squares stays on its device and all are read back at once (one
/// synchronisation per step on a GPU, not one per variable).
pub fn grad_norm(grads: &GradStore, vars: &[&Var]) -> Result<f64> {
    let mut total = 0f64;
    let mut on_device = Vec::new();
    for var in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let g = g.contiguous()?;
        let (storage, layout) = g.storage_and_layout();
        let offsets = layout.contiguous_offsets();
        total += match (&*storage, offsets) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                ordered_sum_of_squares(&v[a..b], |x| x as f64)
            }
            (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) => {
                ordered_sum_of_squares(&v[a..b], |x| x)
            }
            _ => {
                drop(storage);
                on_device.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
                0.0
            }
        };
    }
    if !on_device.is_empty() {
        total += Tensor::stack(&on_device, 0)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// `sum(to_f64(x)^2)`: fixed chunks summed in parallel, their sums added in order, so the
/// result is the same on every run (rayon's `sum` groups by work stealing: the norm's last
/// digits, and through clipping the update, changed between runs and broke exact resume).
fn ordered_sum_of_squares<T: Copy + Sync>(values: &[T], to_f64: impl Fn(T) -> f64 + Sync) -> f64 {
    values
        .par_chunks(1 << 14)
        .map(|chunk| chunk.iter().map(|&x| to_f64(x) * to_f64(x)).sum::<f64>())
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// The factor `torch.nn.utils.clip_grad_norm_` multiplies gradients by:
/// `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping. The trainer instead
/// folds the factor into [`AdamW::step_scaled`], which saves a pass over every gradient.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = clip_scale(norm, max_norm);
    if scale < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(1.0, 10, 100, 0), 0.0);
        assert!((linear_schedule(1.0, 10, 100, 5) - 0.5).abs() < 1e-12);
        assert!((linear_schedule(1.0, 10, 100, 10) - 1.0).abs() < 1e-12);
        assert!((linear_schedule(1.0, 10, 100, 55) - 0.5).abs() < 1e-12);
        assert_eq!(linear_schedule(1.0, 10, 100, 100), 0.0);
    }

    /// A trained, weight-decayed parameter `w` over `var`.
    fn decayed_param(var: &Var) -> Param {
        Param {
            name: "w".into(),
            var: Some(var.clone()),
            tensor: var.as_tensor().clone(),
            decay: true,
            fresh: false,
        }
    }

    /// Two steps of AdamW on a scalar, against the update rule written out by hand (PyTorch).
    #[test]
    fn adamw_matches_the_pytorch_update() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32], &dev).unwrap();
        let param = decayed_param(&var);
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(&[param], config).unwrap();
        let (mut theta, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=2 {
            // loss = theta^2 -> grad 2 theta
            let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
            let g = 2.0 * theta;
            theta *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let update =
                (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            theta -= 0.1 * update;
            let ours = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!((ours - theta).abs() < 1e-6, "step {t}: {ours} vs {theta}");
        }
    }

    /// The in-place CPU kernel (f32) and the tensor path (f64 variables) take the same steps,
    /// with the clipping factor folded in, and the moments survive a state round trip.
    #[test]
    fn kernel_and_tensor_paths_agree_and_state_round_trips() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f64, 1.0, (3, 5), &dev).unwrap();
        let make = |dtype: DType| {
            let var = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
            let param = decayed_param(&var);
            (var, AdamW::new(&[param], AdamWConfig::default()).unwrap())
        };
        let (v32, mut opt32) = make(DType::F32);
        let (v64, mut opt64) = make(DType::F64);
        assert!(matches!(opt32.moments[0], Moments::Host { .. }));
        assert!(matches!(opt64.moments[0], Moments::Tensors { .. }));
        for step in 0..3 {
            for (var, opt) in [(&v32, &mut opt32), (&v64, &mut opt64)] {
                let loss = (var.as_tensor().sqr().unwrap() * (step + 1) as f64)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step_scaled(&loss.backward().unwrap(), 1e-2, 0.5)
                    .unwrap();
            }
        }
        let diff = (v32.as_tensor().to_dtype(DType::F64).unwrap() - v64.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-6, "paths differ by {diff}");

        let state = opt32.state().unwrap();
        let (_, mut fresh) = make(DType::F32);
        fresh.restore(&state, opt32.steps()).unwrap();
        let again = fresh.state().unwrap();
        for key in ["m.w", "v.w"] {
            let same = (&state[key] - &again[key])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{key}");
        }
        let wrong = HashMap::from([
            (
                "m.w".to_string(),
                Tensor::zeros(4, DType::F32, &dev).unwrap(),
            ),
            (
                "v.w".to_string(),
                Tensor::zeros(4, DType::F32, &dev).unwrap(),
            ),
        ]);
        assert!(
            fresh.restore(&wrong, 1).is_err(),
            "a moment of the wrong shape is refused"
        );
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let dev = Device::Cpu;
        let a = Var::new(&[3.0f32], &dev).unwrap();
        let b = Var::new(&[4.0f32], &dev).unwrap();
        let loss = ((a.as_tensor().sqr().unwrap() * 0.5).unwrap()
            + (b.as_tensor().sqr().unwrap() * 0.5).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-5);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(((ga * ga + gb * gb).sqrt() - 1.0).abs() < 1e-4);
    }

    /// The device check runs end to end; on the CPU it compares the CPU with itself.
    #[test]
    fn the_device_check_runs_and_the_cpu_agrees_with_itself() {
        assert_eq!(device_agreement(&Device::Cpu).unwrap(), 0.0);
    }

    /// Gradients the CPU does not read in place (here bf16, as a GPU's all are) are summed on
    /// their device and read back together, beside the f32 ones read in place.
    #[test]
    fn the_norm_joins_gradients_read_in_place_and_on_device() {
        let dev = Device::Cpu;
        let a = Var::new(&[3.0f32, 1.0], &dev).unwrap();
        let b = Var::from_tensor(
            &Tensor::new(&[4.0f32, 2.0], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let c = Var::from_tensor(
            &Tensor::new(&[5.0f32], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        // d(x^2 / 2)/dx = x: the gradients are the values.
        let half_square = |v: &Var| {
            (v.as_tensor().to_dtype(DType::F32).unwrap().sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let loss = ((half_square(&a) + half_square(&b)).unwrap() + half_square(&c)).unwrap();
        let grads = loss.backward().unwrap();
        let norm = grad_norm(&grads, &[&a, &b, &c]).unwrap();
        let expected = (9.0f64 + 1.0 + 16.0 + 4.0 + 25.0).sqrt();
        assert!((norm - expected).abs() < 1e-9, "{norm} against {expected}");
        let device_only = grad_norm(&grads, &[&b, &c]).unwrap();
        assert!((device_only - 45.0f64.sqrt()).abs() < 1e-9, "{device_only}");
    }

    /// The gradient norm's sum of squares is the same bits on any thread count and run.
    #[test]
    fn sum_of_squares_is_the_same_bits_on_any_thread_count() {
        let values: Vec<f32> = (0..200_000)
            .map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5)
            .collect();
        let reference = ordered_sum_of_squares(&values, |x| x as f64);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..5 {
                let total = pool.install(|| ordered_sum_of_squares(&values, |x| x as f64));
                assert_eq!(total.to_bits(), reference.to_bits(), "{threads} threads");
            }
        }
    }
}
