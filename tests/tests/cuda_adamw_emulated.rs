//! The GPU AdamW kernel's logic, checked without a GPU: `crates/finetune/src/cuda/adamw.cu`
//! built under the CPU emulation of `tests/cuda_emulation/`, against the CPU's AdamW (the
//! public optimiser, whose f32 kernel runs on the CPU): over several steps, with and without
//! weight decay, with a clipping scale, the variable and both moments come out the same bits.

use bert::bert_embeddings::nn::SplitMix64;
use bert::{DType, Device, Tensor};
use bert_finetune::trainable::Param;
use bert_finetune::{AdamW, AdamWConfig};
use bert_tests::cuda_emulation::adamw_step;
use candle_core::Var;

/// The kernel's scalars for step `t` (from 1), as `AdamW::step_scaled` derives them.
fn scalars(c: &AdamWConfig, t: i32, lr: f64, decay: bool, grad_scale: f64) -> [f32; 9] {
    let decay = if decay { c.weight_decay } else { 0.0 };
    [
        c.beta1 as f32,
        c.beta2 as f32,
        (1.0 - c.beta1) as f32,
        (1.0 - c.beta2) as f32,
        c.eps as f32,
        (1.0 - lr * decay) as f32,
        (lr / (1.0 - c.beta1.powi(t))) as f32,
        (1.0 - c.beta2.powi(t)).sqrt() as f32,
        grad_scale as f32,
    ]
}

#[test]
fn the_kernel_source_matches_the_cpu_optimiser_bit_for_bit() {
    let mut rng = SplitMix64(21);
    let mut normal = |n: usize, scale: f64| -> Vec<f32> {
        (0..n).map(|_| (scale * rng.next_normal()) as f32).collect()
    };
    // Sizes around the kernel's 256-thread blocks.
    let sizes = [1usize, 255, 700];
    let config = AdamWConfig::default();
    let device = Device::Cpu;
    let initial: Vec<Vec<f32>> = sizes.iter().map(|&n| normal(n, 0.5)).collect();
    let vars: Vec<Var> = initial
        .iter()
        .map(|v| Var::from_vec(v.clone(), v.len(), &device).unwrap())
        .collect();
    // The first two decay (weights), the last does not (a bias).
    let params: Vec<Param> = vars
        .iter()
        .enumerate()
        .map(|(i, var)| Param {
            name: format!("p{i}"),
            var: Some(var.clone()),
            tensor: var.as_tensor().clone(),
            decay: i < 2,
            fresh: false,
        })
        .collect();
    let mut optimizer = AdamW::new(&params, config).unwrap();
    let mut theta = initial.clone();
    let mut first: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut second = first.clone();

    for (step, (lr, grad_scale)) in [(1e-3, 1.0), (5e-4, 0.25), (2e-4, 1.0)].iter().enumerate() {
        let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| normal(n, 3.0)).collect();
        // d(sum(var * g))/dvar = g.
        let loss = vars
            .iter()
            .zip(&grads)
            .map(|(var, g)| {
                let g = Tensor::from_slice(g, g.len(), &device).unwrap();
                (var.as_tensor() * g).unwrap().sum_all().unwrap()
            })
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let store = loss.backward().unwrap();
        optimizer.step_scaled(&store, *lr, *grad_scale).unwrap();
        for i in 0..sizes.len() {
            let s = scalars(&config, step as i32 + 1, *lr, i < 2, *grad_scale);
            adamw_step(&mut theta[i], &grads[i], &mut first[i], &mut second[i], s);
        }
    }

    let state = optimizer.state().unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let host = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    for (i, var) in vars.iter().enumerate() {
        assert_eq!(
            bits(&host(var.as_tensor())),
            bits(&theta[i]),
            "p{i}: variable"
        );
        assert_eq!(
            bits(&host(&state[&format!("m.p{i}")])),
            bits(&first[i]),
            "p{i}: first moment"
        );
        assert_eq!(
            bits(&host(&state[&format!("v.p{i}")])),
            bits(&second[i]),
            "p{i}: second moment"
        );
        assert_ne!(bits(&theta[i]), bits(&initial[i]), "p{i} moved");
    }
}
