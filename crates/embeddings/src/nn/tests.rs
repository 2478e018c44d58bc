//! Both paths of every block (the CPU kernels, the composed ops) held to the same values and
//! gradients.

use super::layer_norm::layer_norm_differentiable;
use super::*;
use candle_core::{Device, Var};

/// Largest absolute difference, in f64 whatever the dtype.
fn max_abs_diff64(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff64(a, b) as f32
}

#[test]
fn layer_norm_is_exact_on_large_offsets() {
    // Rows with a large common offset: E[x^2] - mean^2 in f32 loses the variance here.
    let dev = Device::Cpu;
    let noise = Tensor::randn(0f64, 1.0, (4, 384), &dev).unwrap();
    let x64 = (noise + 300.0).unwrap();
    let w = Tensor::ones(384, DType::F64, &dev).unwrap();
    let b = Tensor::zeros(384, DType::F64, &dev).unwrap();
    let exact = layer_norm_differentiable(&x64, &w, &b, 1e-12).unwrap();
    let x32 = x64.to_dtype(DType::F32).unwrap();
    let (w32, b32) = (
        w.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    let ours = LayerNorm::new(w32, b32, 1e-12).forward(&x32).unwrap();
    let diff = max_abs_diff(&ours, &exact.to_dtype(DType::F32).unwrap());
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn fused_and_differentiable_layer_norm_agree() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 3.0, (2, 5, 16), &dev).unwrap();
    let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
    let fused = LayerNorm::new(w.clone(), b.clone(), 1e-12)
        .forward(&x)
        .unwrap();
    let composed = layer_norm_differentiable(&x, &w, &b, 1e-12).unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-5);
}

#[test]
fn layer_norm_records_gradients_for_trainable_weights() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
    let w = Var::ones(8, DType::F32, &dev).unwrap();
    let b = Var::zeros(8, DType::F32, &dev).unwrap();
    let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
    let loss = ln.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(w.as_tensor()).is_some());
    assert!(grads.get(b.as_tensor()).is_some());
}

/// Every fused CPU kernel against the same function written as composed candle ops: values
/// and the gradients of a weighted sum (random weights, so no gradient is trivially zero),
/// in f64 so the comparison is tight.
#[test]
fn fused_kernels_match_composed_ops_values_and_gradients() {
    let dev = Device::Cpu;
    let check =
        |name: &str, inputs: &[&Var], fused: &dyn Fn() -> Tensor, composed: &dyn Fn() -> Tensor| {
            let (a, b) = (fused(), composed());
            let d = max_abs_diff64(&a, &b);
            assert!(d < 1e-10, "{name}: values differ by {d}\n{a}\n{b}");
            let weights = Tensor::randn(0f64, 1.0, a.shape(), &dev).unwrap();
            let ga = (a * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gb = (b * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, v) in inputs.iter().enumerate() {
                let (x, y) = (
                    ga.get(v.as_tensor()).unwrap(),
                    gb.get(v.as_tensor()).unwrap(),
                );
                let diff = max_abs_diff64(x, y);
                assert!(
                    diff < 1e-9,
                    "{name}: gradient of input {i} differs by {diff}"
                );
            }
        };
    // LayerNorm, rows with a large offset.
    let x =
        Var::from_tensor(&(Tensor::randn(0f64, 2.0, (2, 3, 16), &dev).unwrap() + 50.0).unwrap())
            .unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f64, 0.2, 16, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f64, 0.2, 16, &dev).unwrap()).unwrap();
    let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-12);
    check(
        "layer norm",
        &[&x, &w, &b],
        &|| ln.forward(x.as_tensor()).unwrap(),
        &|| layer_norm_differentiable(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap(),
    );
    // Linear: one GEMM onto the bias against matmul + broadcast add.
    let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 6), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 6), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, 4, &dev).unwrap()).unwrap();
    let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    check(
        "linear",
        &[&x, &w, &b],
        &|| linear.forward(x.as_tensor()).unwrap(),
        &|| {
            x.as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
        },
    );
    // Linear then dropout as one kernel, against the layer and a dropout op.
    let output_dropout = Dropout::new(0.25).unwrap();
    check(
        "linear + dropout",
        &[&x, &w, &b],
        &|| {
            seed_dropout(4);
            linear
                .forward_dropout(x.as_tensor(), Some(&output_dropout), true)
                .unwrap()
        },
        &|| {
            seed_dropout(4);
            let y = x
                .as_tensor()
                .broadcast_matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let mask = output_dropout
                .forward(&Tensor::ones(y.shape(), DType::F64, &dev).unwrap(), true)
                .unwrap();
            (y * mask).unwrap()
        },
    );
    // The fused attention core against split heads, matmuls, softmax and dropout.
    let (batch, seq, heads, head_dim) = (2, 5, 2, 3);
    let qkv: Vec<Var> = (0..3)
        .map(|_| {
            Var::from_tensor(
                &Tensor::randn(0f64, 1.0, (batch, seq, heads * head_dim), &dev).unwrap(),
            )
            .unwrap()
        })
        .collect();
    let padding = Tensor::new(
        &[
            [0f64, 0., 0., 0., 0.],
            [0., 0., 0., f32::MIN as f64, f32::MIN as f64],
        ],
        &dev,
    )
    .unwrap()
    .reshape((batch, 1, 1, seq))
    .unwrap();
    let attention_dropout = Dropout::new(0.2).unwrap();
    let split = |t: &Tensor| {
        t.reshape((batch, seq, heads, head_dim))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    check(
        "attention",
        &[&qkv[0], &qkv[1], &qkv[2]],
        &|| {
            seed_dropout(9);
            let (t, _) = fused_attention(
                qkv[0].as_tensor(),
                qkv[1].as_tensor(),
                qkv[2].as_tensor(),
                heads,
                Some(&padding),
                Some(&attention_dropout),
                false,
            )
            .unwrap()
            .unwrap();
            t
        },
        &|| {
            seed_dropout(9);
            let (q, k, v) = (
                split(qkv[0].as_tensor()),
                split(qkv[1].as_tensor()),
                split(qkv[2].as_tensor()),
            );
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (head_dim as f64).sqrt())
                .unwrap()
                .broadcast_add(&padding)
                .unwrap();
            let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            let mask = attention_dropout
                .forward(
                    &Tensor::ones(probs.shape(), DType::F64, &dev).unwrap(),
                    true,
                )
                .unwrap();
            (probs * mask)
                .unwrap()
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((batch, seq, heads * head_dim))
                .unwrap()
        },
    );
    // Attention softmax with a padding bias on the last keys of the second sequence.
    let scores = Var::from_tensor(&Tensor::randn(0f64, 3.0, (2, 3, 4, 5), &dev).unwrap()).unwrap();
    let bias = Tensor::new(
        &[
            [0f64, 0., 0., 0., 0.],
            [0., 0., 0., f32::MIN as f64, f32::MIN as f64],
        ],
        &dev,
    )
    .unwrap()
    .reshape((2, 1, 1, 5))
    .unwrap();
    check(
        "attention softmax",
        &[&scores],
        &|| attention_probabilities(scores.as_tensor(), Some(&bias), 0.5).unwrap(),
        &|| {
            let z = (scores.as_tensor() * 0.5)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            candle_nn::ops::softmax(&z, D::Minus1).unwrap()
        },
    );
    // GELU: candle's own gelu_erf backward is 4e-7 off in f64 (its erf is approximate),
    // so the gradient is checked against central differences of the forward instead.
    let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (7, 9), &dev).unwrap()).unwrap();
    let gelu = |t: &Tensor| activation(HiddenAct::Gelu, t).unwrap();
    let values = gelu(x.as_tensor());
    assert!(max_abs_diff64(&values, &x.as_tensor().gelu_erf().unwrap()) < 1e-10);
    let grad = values.sum_all().unwrap().backward().unwrap();
    let h = 1e-5;
    let numeric = ((gelu(&(x.as_tensor() + h).unwrap()) - gelu(&(x.as_tensor() - h).unwrap()))
        .unwrap()
        / (2.0 * h))
        .unwrap();
    let diff = max_abs_diff64(grad.get(x.as_tensor()).unwrap(), &numeric);
    assert!(
        diff < 1e-8,
        "gelu: gradient off central differences by {diff}"
    );
    // Dropout: the same seed draws the same mask on both paths.
    let dropout = Dropout::new(0.3).unwrap();
    check(
        "dropout",
        &[&x],
        &|| {
            seed_dropout(5);
            dropout.forward(x.as_tensor(), true).unwrap()
        },
        &|| {
            seed_dropout(5);
            let kept = dropout
                .forward(&Tensor::ones(x.shape(), DType::F64, &dev).unwrap(), true)
                .unwrap();
            (x.as_tensor() * kept).unwrap()
        },
    );
    // Embedding lookup: ids repeat (their gradient rows add up) and some rows are never
    // looked up (their gradient is zero), in every id dtype.
    let table = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &dev).unwrap()).unwrap();
    let embedding = Embedding::new(table.as_tensor().clone());
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let ids = Tensor::new(&[[3u32, 0, 3], [6, 3, 1]], &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        check(
            "embedding",
            &[&table],
            &|| embedding.forward(&ids).unwrap(),
            &|| {
                table
                    .as_tensor()
                    .index_select(&ids.flatten_all().unwrap(), 0)
                    .unwrap()
                    .reshape((2, 3, 5))
                    .unwrap()
            },
        );
    }
}

/// The f32 inference kernel (softmax sums divided out of the `P V` rows) and the path
/// that keeps the probabilities (rows normalised first) agree with each other and with
/// the f64 kernel, with padding, at lengths around the 16-lane width.
#[test]
fn f32_inference_attention_matches_f64() {
    let dev = Device::Cpu;
    let (heads, head_dim) = (3, 8);
    let hidden = heads * head_dim;
    for (batch, seq) in [(2usize, 5usize), (1, 16), (3, 33)] {
        let qkv: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f64, 2.0, (batch, seq, hidden), &dev).unwrap())
            .collect();
        let padding: Vec<f64> = (0..batch * seq)
            .map(|i| {
                if i % seq >= seq - (i / seq) {
                    f32::MIN as f64
                } else {
                    0.0
                }
            })
            .collect();
        let padding = Tensor::from_vec(padding, (batch, 1, 1, seq), &dev).unwrap();
        let run = |dtype: DType, want_probs: bool| {
            let t: Vec<Tensor> = qkv.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
            let bias = padding.to_dtype(dtype).unwrap();
            fused_attention(&t[0], &t[1], &t[2], heads, Some(&bias), None, want_probs)
                .unwrap()
                .unwrap()
                .0
        };
        let exact = run(DType::F64, false);
        let divided = run(DType::F32, false);
        let normalised = run(DType::F32, true);
        let d1 = max_abs_diff64(&divided, &exact);
        let d2 = max_abs_diff64(&normalised, &exact);
        assert!(d1 < 1e-5 && d2 < 1e-5, "{batch} x {seq}: {d1} / {d2}");
    }
}

#[test]
fn dropout_only_in_training() {
    let x = Tensor::ones((1000,), DType::F32, &Device::Cpu).unwrap();
    let d = Dropout::new(0.5).unwrap();
    let eval = d.forward(&x, false).unwrap();
    assert_eq!(max_abs_diff(&eval, &x), 0.0);
    let train = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
    let zeros = train.iter().filter(|&&v| v == 0.0).count();
    assert!((300..700).contains(&zeros), "{zeros} of 1000 dropped");
    assert!(train.iter().all(|&v| v == 0.0 || (v - 2.0).abs() < 1e-6));
    assert!(Dropout::new(1.0).is_err());
}

#[test]
fn dropout_masks_follow_the_seed() {
    let x = Tensor::ones((64,), DType::F32, &Device::Cpu).unwrap();
    let d = Dropout::new(0.3).unwrap();
    seed_dropout(7);
    let a = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
    let b = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
    seed_dropout(7);
    let again = d.forward(&x, true).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, again);
    assert_ne!(a, b);
}

#[test]
fn linear_matches_matmul() {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();
    let y = Linear::new(w.clone(), Some(b.clone())).forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 5, 4]);
    let expected = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert!(max_abs_diff(&y, &expected) < 1e-5);
}

/// The inference layout (weight stored `[in, out]`) gives the checkpoint layout's outputs,
/// across the GEMM's small-batch and large-batch paths (and, in f32, the panel kernel for
/// few rows) and sizes that are not multiples of their register tiles, in f64 (tight) and
/// f32; a weight of any other striding is refused.
#[test]
fn inference_layout_matches_checkpoint_layout() {
    let dev = Device::Cpu;
    for (rows, in_dim, out_dim) in [(1, 384, 1536), (16, 384, 384), (300, 37, 53), (7, 5, 1)] {
        for dtype in [DType::F64, DType::F32] {
            let w = Tensor::randn(0f64, 1.0, (out_dim, in_dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let b = Tensor::randn(0f64, 1.0, out_dim, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let x = Tensor::randn(0f64, 1.0, (rows, in_dim), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let stored = Linear::new(w, Some(b));
            let mut transposed = stored.clone();
            transposed.use_inference_layout().unwrap();
            // Idempotent: a second call keeps the layout.
            transposed.use_inference_layout().unwrap();
            if out_dim > 1 {
                assert_eq!(transposed.weight().stride(), [1, out_dim]);
            }
            assert_eq!(transposed.weight().dims(), [out_dim, in_dim]);
            let (a, c) = (stored.forward(&x).unwrap(), transposed.forward(&x).unwrap());
            let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
            let d = max_abs_diff64(&a, &c);
            assert!(d < tolerance, "{rows}x{in_dim}x{out_dim} {dtype:?}: {d}");
        }
    }
    // A weight that is a strided slice of a wider one (neither layout) is copied, not misread.
    let wide = Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap();
    let w = wide.narrow(1, 2, 3).unwrap();
    let b = Tensor::zeros(6, DType::F32, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 3), &dev).unwrap();
    let y = Linear::new(w.clone(), Some(b)).forward(&x).unwrap();
    let expected = x.matmul(&w.t().unwrap()).unwrap();
    assert!(max_abs_diff(&y, &expected) < 1e-5);
}

/// Merging a LoRA adapter gives `W + scaling * B A` (computed here in f64 with tensor ops)
/// from a weight in either layout, in f64 (tight) and f32, across sizes above and below the
/// threaded threshold, leaves the weight stored transposed and the adapter gone; a weight of
/// another striding and a half-precision one take the tensor-op merge, with the same values.
#[test]
fn merged_adapter_is_w_plus_scaled_b_a() {
    let dev = Device::Cpu;
    let randn = |shape: (usize, usize), dtype: DType| {
        Tensor::randn(0f64, 1.0, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    for (out_dim, in_dim, rank) in [(1536, 384, 32), (384, 1536, 8), (53, 37, 3), (1, 5, 1)] {
        for dtype in [DType::F64, DType::F32] {
            for stored_transposed in [false, true] {
                let (w, a, b) = (
                    randn((out_dim, in_dim), dtype),
                    randn((rank, in_dim), dtype),
                    randn((out_dim, rank), dtype),
                );
                let scaling = 0.75;
                let expected = (w.to_dtype(DType::F64).unwrap()
                    + (b.to_dtype(DType::F64).unwrap())
                        .matmul(&a.to_dtype(DType::F64).unwrap())
                        .unwrap()
                        * scaling)
                    .unwrap();
                let mut linear = Linear::new(w, None);
                if stored_transposed {
                    linear.store_transposed().unwrap();
                }
                let adapter = LoraAdapter::new(a, b, scaling, Dropout::new(0.0).unwrap());
                linear.set_adapter(Some(adapter.unwrap())).unwrap();
                linear.merge_adapter().unwrap();
                assert!(linear.adapter().is_none());
                let merged = linear.weight();
                assert_eq!(merged.dims(), [out_dim, in_dim]);
                assert_eq!(merged.dtype(), dtype);
                if out_dim > 1 {
                    assert_eq!(merged.stride(), [1, out_dim]);
                }
                let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                let d = max_abs_diff64(merged, &expected);
                assert!(d < tolerance, "{out_dim}x{in_dim} r{rank} {dtype:?}: {d}");
            }
        }
    }
    for (w, a, b) in [
        (
            randn((6, 8), DType::F32).narrow(1, 2, 3).unwrap(),
            randn((2, 3), DType::F32),
            randn((6, 2), DType::F32),
        ),
        (
            randn((6, 3), DType::F16),
            randn((2, 3), DType::F16),
            randn((6, 2), DType::F16),
        ),
    ] {
        let expected = (w.to_dtype(DType::F32).unwrap()
            + b.to_dtype(DType::F32)
                .unwrap()
                .matmul(&a.to_dtype(DType::F32).unwrap())
                .unwrap())
        .unwrap();
        let mut linear = Linear::new(w.clone(), None);
        let adapter = LoraAdapter::new(a, b, 1.0, Dropout::new(0.0).unwrap()).unwrap();
        linear.set_adapter(Some(adapter)).unwrap();
        linear.merge_adapter().unwrap();
        let merged = linear.weight().to_dtype(DType::F32).unwrap();
        let d = max_abs_diff(&merged, &expected);
        assert!(d < 2e-2, "{:?} {:?}: {d}", w.dtype(), w.stride());
    }
}

/// The GELU fused into the linear kernel gives the layer-then-activation values, in both
/// weight layouts and (f32) through the small-batch panel kernel as well as the GEMM; a
/// weight that tracks gradients takes the unfused path (which has a backward).
#[test]
fn fused_gelu_matches_linear_then_activation() {
    let dev = Device::Cpu;
    for (dtype, rows) in [(DType::F64, 70), (DType::F32, 70), (DType::F32, 9)] {
        let w = Tensor::randn(0f64, 1.0, (48, 20), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = Tensor::randn(0f64, 1.0, 48, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let x = Tensor::randn(0f64, 1.0, (3, rows, 20), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let mut linear = Linear::new(w.clone(), Some(b.clone()));
        let expected = activation(HiddenAct::Gelu, &linear.forward(&x).unwrap()).unwrap();
        let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for _ in 0..2 {
            let fused = linear.forward_activation(&x, HiddenAct::Gelu).unwrap();
            let d = max_abs_diff64(&fused, &expected);
            assert!(d < tolerance, "{dtype:?} {rows}: {d}");
            linear.use_inference_layout().unwrap();
        }
        let relu = linear.forward_activation(&x, HiddenAct::Relu).unwrap();
        assert!(max_abs_diff64(&relu, &linear.forward(&x).unwrap().relu().unwrap()) < tolerance);
    }
    let w = Var::randn(0f32, 1.0, (8, 4), &dev).unwrap();
    let b = Var::randn(0f32, 1.0, 8, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
    let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    let y = linear.forward_activation(&x, HiddenAct::Gelu).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(w.as_tensor()).is_some());
}

/// The residual started from inside the linear kernel gives `linear(x) + residual`, in
/// both weight layouts, through the panel kernel (f32, few rows), the GEMM and the
/// parallel row fill (over 64K outputs); a residual of another shape is an error, and a
/// weight that tracks gradients takes the composed path, which has a backward.
#[test]
fn fused_residual_matches_linear_plus_residual() {
    let dev = Device::Cpu;
    for (dtype, rows) in [(DType::F64, 70), (DType::F32, 700), (DType::F32, 9)] {
        let randn = |shape: &[usize]| {
            Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (w, b, x, residual) = (
            randn(&[48, 20]),
            randn(&[48]),
            randn(&[3, rows, 20]),
            randn(&[3, rows, 48]),
        );
        let mut linear = Linear::new(w, Some(b));
        let expected = (linear.forward(&x).unwrap() + &residual).unwrap();
        let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for _ in 0..2 {
            let fused = linear.forward_residual(&x, &residual).unwrap();
            let d = max_abs_diff64(&fused, &expected);
            assert!(d < tolerance, "{dtype:?} {rows}: {d}");
            linear.use_inference_layout().unwrap();
        }
        let wrong = randn(&[3, rows, 47]);
        let err = linear.forward_residual(&x, &wrong).unwrap_err().to_string();
        assert!(err.contains("residual"), "{err}");
    }
    let w = Var::randn(0f32, 1.0, (8, 4), &dev).unwrap();
    let b = Var::randn(0f32, 1.0, 8, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
    let residual = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
    let linear = Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()));
    let y = linear.forward_residual(&x, &residual).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(w.as_tensor()).is_some());
}

/// Panels are packed for a weight stored transposed, not for a strided view into a larger
/// block (fused query/key/value), and `use_inference_layout` does both halves.
#[test]
fn panels_only_for_weights_stored_transposed() {
    if !crate::panel_gemm::PanelWeights::available() {
        return;
    }
    let dev = Device::Cpu;
    let block = Tensor::randn(0f32, 1.0, (20, 3 * 48), &dev).unwrap();
    let mut view = Linear::new(block.narrow(1, 48, 48).unwrap().t().unwrap(), None);
    view.pack_for_small_batches().unwrap();
    assert!(view.panels.is_none());
    let mut plain = Linear::new(Tensor::randn(0f32, 1.0, (48, 20), &dev).unwrap(), None);
    plain.pack_for_small_batches().unwrap();
    assert!(plain.panels.is_none(), "not yet stored transposed");
    plain.store_transposed().unwrap();
    plain.pack_for_small_batches().unwrap();
    assert!(plain.panels.is_some());
    let mut both = Linear::new(Tensor::randn(0f32, 1.0, (48, 20), &dev).unwrap(), None);
    both.use_inference_layout().unwrap();
    assert!(both.panels.is_some());
}

/// A fused block's output where it must apply (the AVX-512 kernel packed): there, within
/// 1e-5 of the layers' `expected`; elsewhere, none.
fn assert_fused_matches(what: &str, fused: Option<Tensor>, expected: &Tensor, avx512: bool) {
    match fused {
        Some(y) => {
            assert!(avx512, "{what} without the AVX-512 kernel");
            assert_eq!(y.dims(), expected.dims());
            let d = max_abs_diff(&y, expected);
            assert!(d < 1e-5, "{what} against the layers: {d}");
        }
        None => assert!(!avx512, "the {what} applies here"),
    }
}

/// The fused feed-forward block (AVX-512, f32, from `FeedForwardOp::MIN_ROWS` rows) gives
/// what the two layers give one after the other, over whole and partial blocks of rows; below
/// its row count, in f64, with an adapter, with another activation or while weights track
/// gradients it does not apply (`None`).
#[test]
fn fused_feed_forward_matches_the_layers() {
    let dev = Device::Cpu;
    let (hidden, inner) = (40, 160);
    let randn = |shape: &[usize], scale: f64| {
        (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap()
    };
    let mut intermediate = Linear::new(randn(&[inner, hidden], 0.2), Some(randn(&[inner], 0.5)));
    let mut output = Linear::new(randn(&[hidden, inner], 0.1), Some(randn(&[hidden], 0.5)));
    let norm = LayerNorm::new(randn(&[hidden], 1.0), randn(&[hidden], 1.0), 1e-12);
    let layers = |x: &Tensor, intermediate: &Linear, output: &Linear| {
        let inner = intermediate.forward_activation(x, HiddenAct::Gelu).unwrap();
        output.forward_residual_norm(&inner, x, &norm).unwrap()
    };
    let rows = crate::kernels::FeedForwardOp::MIN_ROWS + 29;
    let x = randn(&[1, rows, hidden], 1.0);
    let fused = |x: &Tensor, intermediate: &Linear, output: &Linear, act| {
        fused_feed_forward(x, intermediate, act, output, &norm).unwrap()
    };
    // Not packed yet: the layers run.
    assert!(fused(&x, &intermediate, &output, HiddenAct::Gelu).is_none());
    intermediate.use_inference_layout().unwrap();
    output.use_inference_layout().unwrap();
    let avx512 = intermediate.panels.as_ref().is_some_and(|p| p.is_avx512());
    let expected = layers(&x, &intermediate, &output);
    let y = fused(&x, &intermediate, &output, HiddenAct::Gelu);
    assert_fused_matches("fused feed-forward block", y, &expected, avx512);
    // Too few rows, another activation, f64: the layers.
    let short = x
        .narrow(1, 0, crate::kernels::FeedForwardOp::MIN_ROWS - 1)
        .unwrap();
    assert!(fused(&short, &intermediate, &output, HiddenAct::Gelu).is_none());
    assert!(fused(&x, &intermediate, &output, HiddenAct::Relu).is_none());
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(fused(&x64, &intermediate, &output, HiddenAct::Gelu).is_none());
    // An input that tracks a gradient takes the layers, which have a backward.
    let tracked = Var::from_tensor(&x).unwrap();
    assert!(fused(tracked.as_tensor(), &intermediate, &output, HiddenAct::Gelu).is_none());
    // An unmerged adapter: the layers, which add its update.
    let adapter = LoraAdapter::new(
        randn(&[4, hidden], 0.1),
        randn(&[inner, 4], 0.1),
        2.0,
        Dropout::new(0.0).unwrap(),
    )
    .unwrap();
    intermediate.set_adapter(Some(adapter)).unwrap();
    assert!(fused(&x, &intermediate, &output, HiddenAct::Gelu).is_none());
}

/// The fused attention block (AVX-512, f32, two sequences or more per thread, from 192
/// tokens) gives what the fused QKV projection, the packed attention kernel and the output
/// layer give one after the other, with a padding mask; where it does not apply (f64, too
/// few sequences, a head size the kernel lacks, an unpacked layer) it says so (`None`).
#[test]
fn fused_attention_block_matches_the_layers() {
    let dev = Device::Cpu;
    let (hidden, heads) = (32, 2);
    let randn = |shape: &[usize], scale: f64| {
        (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap()
    };
    let mut qkv = Linear::new(
        randn(&[3 * hidden, hidden], 0.3),
        Some(randn(&[3 * hidden], 0.3)),
    );
    let mut output = Linear::new(randn(&[hidden, hidden], 0.2), Some(randn(&[hidden], 0.5)));
    let norm = LayerNorm::new(randn(&[hidden], 1.0), randn(&[hidden], 1.0), 1e-12);
    let threads = candle_core::utils::get_num_threads();
    let (batch, seq) = (2 * threads + 1, 200 / (2 * threads) + 7);
    let x = randn(&[batch, seq, hidden], 1.0);
    // Padding: sequence b keeps its first seq - b % 5 tokens.
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| {
            if i % seq < seq - (i / seq) % 5 {
                0.0
            } else {
                -10000.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (batch, 1, 1, seq), &dev).unwrap();
    let block = |x: &Tensor, qkv: &Linear, output: &Linear, heads| {
        fused_attention_block(x, qkv, heads, Some(&mask), output, &norm).unwrap()
    };
    // Not packed yet: the layers run.
    assert!(block(&x, &qkv, &output, heads).is_none());
    qkv.use_inference_layout().unwrap();
    output.use_inference_layout().unwrap();
    let packed = qkv.forward_t(&x, false).unwrap();
    let (context, _) = fused_attention_packed(&packed, heads, Some(&mask), false)
        .unwrap()
        .expect("the packed kernel applies on the CPU");
    let expected = output.forward_residual_norm(&context, &x, &norm).unwrap();
    let avx512 = qkv.panels.as_ref().is_some_and(|p| p.is_avx512());
    let y = block(&x, &qkv, &output, heads);
    assert_fused_matches("fused attention block", y, &expected, avx512);
    // Heads of 8 (no kernel), too few sequences, f64: the layers.
    assert!(block(&x, &qkv, &output, 4).is_none());
    let few = x.narrow(0, 0, 2 * threads - 1).unwrap();
    let few_mask = mask.narrow(0, 0, 2 * threads - 1).unwrap();
    assert!(
        fused_attention_block(&few, &qkv, heads, Some(&few_mask), &output, &norm)
            .unwrap()
            .is_none()
    );
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(block(&x64, &qkv, &output, heads).is_none());
}

/// `skip(n)` lands where `n` draws would: a device drawing the skipped flags itself (the CUDA
/// dropout mask) leaves the host stream exactly where drawing them here would.
#[test]
fn skipping_draws_matches_drawing_them() {
    for n in [0u64, 1, 7, 1000] {
        let (mut drawn, mut skipped) = (SplitMix64(42), SplitMix64(42));
        for _ in 0..n {
            drawn.next_u64();
        }
        skipped.skip(n);
        assert_eq!(drawn.next_u64(), skipped.next_u64(), "n = {n}");
    }
}
