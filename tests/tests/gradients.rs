//! Gradient check: every parameter's gradient of the BCE loss on a fixed batch, dropout off,
//! against PyTorch's (tests/fixtures/tiny-cross-encoder/gradients.safetensors, written by
//! tests/scripts/generate_fixtures.py), within 1e-4 relative to the tensor's largest gradient.
//! An absolute 1e-9 more is allowed for gradients that are zero in exact arithmetic (the key
//! bias: softmax ignores a score shift shared by all keys), where both sides hold only roundoff.

use bert::{BertInputs, DType, Device, ForwardOptions, ModelFiles};
use bert_finetune::{load_trainable, Loss, Trainable};
use bert_tests::{assert_gradient_close, fixture, max_abs_diff, outputs};
use candle_core::safetensors::load;

#[test]
fn every_gradient_matches_pytorch() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let config = files.read_config().unwrap();
    let trainable =
        load_trainable(&files, &config, Trainable::All, DType::F32, &Device::Cpu, 0).unwrap();
    assert!(trainable.params.iter().all(|p| !p.fresh && p.var.is_some()));

    let batch = outputs("tiny-cross-encoder");
    let reference = load(
        fixture("tiny-cross-encoder").join("gradients.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let inputs = BertInputs::new(&batch["input_ids"])
        .with_attention_mask(&batch["attention_mask"])
        .with_token_type_ids(&batch["token_type_ids"]);
    let seq = batch["attention_mask"].dim(1).unwrap();
    assert!(
        bert_tests::lengths(&batch["attention_mask"])
            .iter()
            .any(|&l| l < seq),
        "the batch has padding, so skipping it changes the path"
    );
    // Padded, then padding-free: gradients flow through the packing, the per-sequence
    // attention and the unpacking alike.
    for options in [
        ForwardOptions::inference(),
        ForwardOptions::inference().with_skip_padding(),
    ] {
        let logits = trainable.model.forward(&inputs, &options).unwrap().logits;
        let loss = Loss::for_config(&config)
            .compute(&logits, &reference["labels"])
            .unwrap();
        let expected_loss = reference["loss"].to_vec1::<f32>().unwrap()[0];
        assert!((loss.to_scalar::<f32>().unwrap() - expected_loss).abs() < 1e-6);

        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for param in &trainable.params {
            let expected = &reference[&format!("grad.{}", param.name)];
            let ours = grads
                .get(param.var.as_ref().unwrap().as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {} ({options:?})", param.name));
            assert_gradient_close(&format!("{} ({options:?})", param.name), ours, expected);
            checked += 1;
        }
        let expected_count = reference.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            checked, expected_count,
            "every PyTorch parameter has a counterpart"
        );
    }
}

/// With the encoder frozen, only the pooler and classifier are variables: a training step moves
/// them and leaves every encoder weight bit-identical.
#[test]
fn frozen_encoder_stays_frozen() {
    use bert_finetune::{AdamW, AdamWConfig};
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let config = files.read_config().unwrap();
    let trainable = load_trainable(
        &files,
        &config,
        Trainable::HeadOnly,
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap();
    for p in &trainable.params {
        let head = p.name.starts_with("classifier.") || p.name.contains("pooler.");
        assert_eq!(p.var.is_some(), head, "{}", p.name);
    }
    // Deep copies: a variable's tensor shares storage with it and would move along.
    let before: std::collections::HashMap<_, _> = trainable
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.copy().unwrap()))
        .collect();
    let batch = outputs("tiny-cross-encoder");
    let inputs = BertInputs::new(&batch["input_ids"]).with_attention_mask(&batch["attention_mask"]);
    let logits = trainable
        .model
        .forward(&inputs, &ForwardOptions::training())
        .unwrap()
        .logits;
    let labels = candle_core::Tensor::new(&[1f32, 0.0, 1.0], &Device::Cpu).unwrap();
    let grads = Loss::BceWithLogits
        .compute(&logits, &labels)
        .unwrap()
        .backward()
        .unwrap();
    let mut optimizer = AdamW::new(
        &trainable.params,
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    optimizer.step(&grads, 1e-2).unwrap();
    let after = trainable.tensors().unwrap();
    for (name, tensor) in &before {
        let moved = max_abs_diff(tensor, &after[name]) > 0.0;
        let head = name.starts_with("classifier.") || name.contains("pooler.");
        assert_eq!(moved, head, "{name} moved: {moved}");
    }
}
