//! The optimiser pipeline against PyTorch step by step: the tiny cross-encoder, dropout off,
//! fixed batches; BCE, clipping at 1.0, AdamW with decay groups on the linear warm-up/decay
//! schedule (tests/scripts/generate_training_fixture.py). Every step's loss and every final
//! weight must agree, except the attention key biases: their gradient is zero in exact
//! arithmetic (softmax ignores a shift shared by all keys), both sides hold roundoff there, and
//! Adam turns any nonzero gradient into a step of about lr, so those weights wander differently.

use bert::{BertInputs, DType, Device, ForwardOptions, ModelFiles};
use bert_finetune::{
    clip_grad_norm, linear_schedule, load_trainable, AdamW, AdamWConfig, Loss, Trainable,
};
use bert_tests::{assert_close, fixture};

#[test]
fn six_steps_track_pytorch() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let mut config = files.read_config().unwrap();
    config.hidden_dropout_prob = 0.0;
    config.attention_probs_dropout_prob = 0.0;
    let model =
        load_trainable(&files, &config, Trainable::All, DType::F32, &Device::Cpu, 0).unwrap();
    let reference = candle_core::safetensors::load(
        fixture("tiny-cross-encoder").join("trajectory.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let expected_losses = reference["losses"].to_vec1::<f64>().unwrap();
    let steps = expected_losses.len() as u64;
    let mut optimizer = AdamW::new(
        &model.params,
        AdamWConfig {
            lr: 1e-3,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let vars: Vec<_> = model.params.iter().filter_map(|p| p.var.as_ref()).collect();
    for step in 0..steps {
        let get = |key: &str| &reference[&format!("step{step}.{key}")];
        let inputs = BertInputs::new(get("input_ids"))
            .with_attention_mask(get("attention_mask"))
            .with_token_type_ids(get("token_type_ids"));
        let logits = model
            .model
            .forward(&inputs, &ForwardOptions::training())
            .unwrap()
            .logits;
        let loss = Loss::BceWithLogits.compute(&logits, get("labels")).unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - expected_losses[step as usize]).abs() < 2e-5,
            "step {step}: loss {value} vs {}",
            expected_losses[step as usize]
        );
        let mut grads = loss.backward().unwrap();
        clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        // PyTorch's scheduler: the lr of step k is the schedule at k (warm-up 1 step of 6).
        optimizer
            .step(&grads, linear_schedule(1e-3, 1, steps, step))
            .unwrap();
    }
    for param in model
        .params
        .iter()
        .filter(|p| !p.name.ends_with("attention.self.key.bias"))
    {
        let ours = param.var.as_ref().unwrap().as_tensor();
        assert_close(
            &format!("final {}", param.name),
            ours,
            &reference[&format!("final.{}", param.name)],
            2e-5,
        );
    }
}
