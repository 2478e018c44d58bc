//! Gradients in training mode (dropout on): with the dropout stream re-seeded before every
//! forward pass the masks are fixed, so analytical gradients must match finite differences.

use bert::bert_embeddings::nn::seed_dropout;
use bert::{BertInputs, DType, Device, ForwardOptions, ModelFiles};
use bert_finetune::{load_trainable, Loss, Trainable};
use bert_tests::{fixture, outputs};
use candle_core::Tensor;

#[test]
fn training_mode_gradients_match_finite_differences() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let config = files.read_config().unwrap();
    // f64 so finite differences are exact enough to compare.
    let trainable =
        load_trainable(&files, &config, Trainable::All, DType::F64, &Device::Cpu, 0).unwrap();
    let batch = outputs("tiny-cross-encoder");
    let inputs = BertInputs::new(&batch["input_ids"])
        .with_attention_mask(&batch["attention_mask"])
        .with_token_type_ids(&batch["token_type_ids"]);
    let labels = Tensor::new(&[0.2f32, 0.9, 0.5], &Device::Cpu).unwrap();
    let loss = || {
        seed_dropout(1234);
        let logits = trainable
            .model
            .forward(&inputs, &ForwardOptions::training())
            .unwrap()
            .logits;
        Loss::BceWithLogits.compute(&logits, &labels).unwrap()
    };
    let grads = loss().backward().unwrap();
    let eps = 1e-6;
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.intermediate.dense.weight",
        "bert.encoder.layer.1.output.LayerNorm.weight",
        "bert.pooler.dense.weight",
        "classifier.weight",
    ] {
        let param = trainable.params.iter().find(|p| p.name == name).unwrap();
        let var = param.var.as_ref().unwrap();
        let grad = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        // The entry with the largest gradient, where the comparison is most telling.
        let index = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        let shifted = |delta: f64| {
            let mut values = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            values[index] += delta;
            var.set(&Tensor::from_vec(values, original.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = loss()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            var.set(&original).unwrap();
            l
        };
        let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
        let analytic = grad[index];
        assert!(
            (numeric - analytic).abs() <= 1e-4 * analytic.abs().max(1e-3),
            "{name}[{index}]: finite difference {numeric:e}, gradient {analytic:e}"
        );
    }
}
