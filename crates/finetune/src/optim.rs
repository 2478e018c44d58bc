//! AdamW with per-parameter weight decay, the linear warm-up/decay schedule, and gradient
//! clipping by global norm: the recipe of transformers' Trainer and sentence-transformers'
//! `CrossEncoder.fit`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

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
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var, bool)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: u64,
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
        let zeros = |v: &Var| {
            v.as_tensor()
                .zeros_like()
                .and_then(|t| t.to_dtype(DType::F32))
        };
        let first = params
            .iter()
            .map(|(_, v, _)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let second = params
            .iter()
            .map(|(_, v, _)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config,
            params,
            first,
            second,
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
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var, decay)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let grad = grad.to_dtype(DType::F32)?;
            let m = ((&self.first[i] * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
            let v = ((&self.second[i] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + c.eps)?)?;
            let mut theta = var.as_tensor().to_dtype(DType::F32)?;
            if *decay && c.weight_decay != 0.0 {
                theta = (&theta * (1.0 - lr * c.weight_decay))?;
            }
            let theta = (theta - (update * lr)?)?;
            var.set(&theta.to_dtype(var.dtype())?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// The moments by `m.NAME` / `v.NAME`, for a training-state checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut state = HashMap::new();
        for (i, (name, _, _)) in self.params.iter().enumerate() {
            state.insert(format!("m.{name}"), self.first[i].clone());
            state.insert(format!("v.{name}"), self.second[i].clone());
        }
        state
    }

    /// Restores moments and the step count saved by [`AdamW::state`].
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            let get = |key: String| {
                state
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| Error::Setting(format!("optimizer state lacks {key}")))
            };
            self.first[i] = get(format!("m.{name}"))?.to_device(var.device())?;
            self.second[i] = get(format!("v.{name}"))?.to_device(var.device())?;
        }
        self.step = step;
        Ok(())
    }
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

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            total += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    let scale = max_norm / (norm + 1e-6);
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

    /// Two steps of AdamW on a scalar, against the update rule written out by hand (PyTorch).
    #[test]
    fn adamw_matches_the_pytorch_update() {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f32], &dev).unwrap();
        let param = Param {
            name: "w".into(),
            var: Some(var.clone()),
            tensor: var.as_tensor().clone(),
            decay: true,
            fresh: false,
        };
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
}
