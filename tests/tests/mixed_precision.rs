//! Mixed precision (`ForwardOptions::compute_dtype`): the layers compute in bf16 or f16 while
//! the trained weights stay f32 (master weights). Their gradients arrive in f32 and follow
//! PyTorch's f32 gradients to half-precision accuracy, and AdamW steps in that mode lower the
//! loss as f32 steps do.

use bert::{BertInputs, DType, Device, ForwardOptions, ModelFiles};
use bert_finetune::{load_trainable, AdamW, AdamWConfig, Loss, Trainable, TrainableClassifier};
use bert_tests::{cosine, fixture, max_abs_diff, outputs};
use candle_core::safetensors::load;
use candle_core::Tensor;

fn tiny() -> (TrainableClassifier, bert::Config) {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let config = files.read_config().unwrap();
    let model =
        load_trainable(&files, &config, Trainable::All, DType::F32, &Device::Cpu, 0).unwrap();
    (model, config)
}

fn loss_of(
    model: &TrainableClassifier,
    config: &bert::Config,
    batch: &std::collections::HashMap<String, Tensor>,
    labels: &Tensor,
    options: &ForwardOptions,
) -> Tensor {
    let inputs = BertInputs::new(&batch["input_ids"])
        .with_attention_mask(&batch["attention_mask"])
        .with_token_type_ids(&batch["token_type_ids"]);
    let logits = model.model.forward(&inputs, options).unwrap().logits;
    // The arithmetic really ran in the compute dtype.
    assert_eq!(logits.dtype(), options.compute_dtype.unwrap_or(DType::F32));
    Loss::for_config(config).compute(&logits, labels).unwrap()
}

#[test]
fn half_compute_gradients_reach_f32_weights_and_follow_pytorch() {
    let (model, config) = tiny();
    let batch = outputs("tiny-cross-encoder");
    let reference = load(
        fixture("tiny-cross-encoder").join("gradients.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let options = ForwardOptions::inference().with_compute_dtype(dtype);
        let loss = loss_of(&model, &config, &batch, &reference["labels"], &options);
        let expected_loss = reference["loss"].to_vec1::<f32>().unwrap()[0];
        let loss_value = loss
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (loss_value - expected_loss).abs() < 2e-3,
            "{dtype:?}: loss {loss_value} against PyTorch's f32 {expected_loss}"
        );
        let grads = loss.backward().unwrap();
        // bf16 keeps 8 bits of mantissa, f16 11.
        let least_cosine = if dtype == DType::BF16 { 0.995 } else { 0.999 };
        for param in &model.params {
            let var = param.var.as_ref().unwrap();
            assert_eq!(var.dtype(), DType::F32, "{} master weight", param.name);
            let ours = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{dtype:?}: no gradient for {}", param.name));
            assert_eq!(ours.dtype(), DType::F32, "{} gradient", param.name);
            let expected = &reference[&format!("grad.{}", param.name)];
            if param.name.ends_with("key.bias") {
                // Zero in exact arithmetic (softmax ignores a shift shared by every key):
                // only roundoff on either side, so its direction means nothing; its size must
                // stay at roundoff.
                let scale = max_abs_diff(expected, &expected.zeros_like().unwrap()).max(1e-12);
                let size = max_abs_diff(ours, &ours.zeros_like().unwrap());
                assert!(
                    size < 1e-6,
                    "{dtype:?} {}: {size:e} (reference {scale:e})",
                    param.name
                );
                continue;
            }
            let c = cosine(ours, expected);
            assert!(
                c >= least_cosine,
                "{dtype:?} {}: cosine {c} to PyTorch's",
                param.name
            );
        }
    }
}

#[test]
fn bf16_compute_steps_lower_the_loss_like_f32_steps() {
    let batch = outputs("tiny-cross-encoder");
    let labels = load(
        fixture("tiny-cross-encoder").join("gradients.safetensors"),
        &Device::Cpu,
    )
    .unwrap()["labels"]
        .clone();
    let mut finals = Vec::new();
    for compute in [None, Some(DType::BF16)] {
        let (model, config) = tiny();
        let mut options = ForwardOptions::inference();
        options.compute_dtype = compute;
        let mut optimizer = AdamW::new(
            &model.params,
            AdamWConfig {
                lr: 3e-3,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let value = |loss: &Tensor| {
            loss.to_dtype(DType::F32)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let first = value(&loss_of(&model, &config, &batch, &labels, &options));
        for _ in 0..30 {
            let loss = loss_of(&model, &config, &batch, &labels, &options);
            optimizer.step(&loss.backward().unwrap(), 3e-3).unwrap();
        }
        let last = value(&loss_of(&model, &config, &batch, &labels, &options));
        println!("{compute:?}: loss {first} -> {last}");
        assert!(last < 0.8 * first, "{compute:?}: loss {first} -> {last}");
        assert!(model
            .params
            .iter()
            .all(|p| p.current().dtype() == DType::F32));
        finals.push(last);
    }
    println!("final losses f32 / bf16 compute: {finals:?}");
    assert!((finals[0] - finals[1]).abs() < 0.01, "{finals:?}");
}
