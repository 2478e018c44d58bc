//! Parity of every architecture against HF transformers on small random-config checkpoints
//! (tests/fixtures/tiny-*, written by tests/scripts/generate_fixtures.py). No download needed.

use std::collections::HashMap;

use bert::{
    load, BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining,
    BertForSequenceClassification, BertInputs, BertModel, ClassifierActivation, DType, Device,
    ForwardOptions, ModelFiles, Tensor,
};
use bert_tests::{
    assert_close, assert_half_close, fixture, lengths, max_abs_diff, outputs, real_tokens, row,
};

const TOLERANCE: f64 = 5e-5;

/// Every output of the architecture the checkpoint names, keyed as the fixture keys them.
fn run(name: &str, dtype: DType, inputs: &BertInputs, bare: bool) -> HashMap<String, Tensor> {
    let options = ForwardOptions::inference()
        .with_hidden_states()
        .with_attentions();
    run_with(name, dtype, inputs, bare, &options)
}

/// [`run`] with other options (attentions only where they ask for them).
fn run_with(
    name: &str,
    dtype: DType,
    inputs: &BertInputs,
    bare: bool,
    options: &ForwardOptions,
) -> HashMap<String, Tensor> {
    let files = ModelFiles::from_dir(fixture(name)).unwrap();
    let architecture = files.read_config().unwrap().architectures[0].clone();
    let device = Device::Cpu;
    let options = *options;
    let mut out = HashMap::new();
    let mut put = |key: &str, t: Tensor| {
        out.insert(key.to_string(), t);
    };
    let (hidden, attentions) = match (bare, architecture.as_str()) {
        (true, _) | (false, "BertModel") => {
            let o = load::<BertModel>(&files, dtype, &device)
                .unwrap()
                .model
                .forward(inputs, &options)
                .unwrap();
            put("last_hidden_state", o.last_hidden_state);
            if let Some(p) = o.pooler_output {
                put("pooler_output", p);
            }
            (o.hidden_states, o.attentions)
        }
        (false, "BertForSequenceClassification") => {
            let o = load::<BertForSequenceClassification>(&files, dtype, &device)
                .unwrap()
                .model
                .forward(inputs, &options)
                .unwrap();
            put("logits", o.logits);
            (o.hidden_states, o.attentions)
        }
        (false, "BertForMaskedLM") => {
            let o = load::<BertForMaskedLM>(&files, dtype, &device)
                .unwrap()
                .model
                .forward(inputs, &options)
                .unwrap();
            put("logits", o.logits);
            (o.hidden_states, o.attentions)
        }
        (false, "BertForNextSentencePrediction") => {
            let o = load::<BertForNextSentencePrediction>(&files, dtype, &device)
                .unwrap()
                .model
                .forward(inputs, &options)
                .unwrap();
            put("logits", o.logits);
            (o.hidden_states, o.attentions)
        }
        (false, "BertForPreTraining") => {
            let o = load::<BertForPreTraining>(&files, dtype, &device)
                .unwrap()
                .model
                .forward(inputs, &options)
                .unwrap();
            put("prediction_logits", o.prediction_logits);
            put("seq_relationship_logits", o.seq_relationship_logits);
            (o.hidden_states, o.attentions)
        }
        (_, other) => panic!("fixture {name} has unexpected architecture {other}"),
    };
    for (i, t) in hidden.unwrap().into_iter().enumerate() {
        put(&format!("hidden_states.{i}"), t);
    }
    for (i, t) in attentions.into_iter().flatten().enumerate() {
        put(&format!("attentions.{i}"), t);
    }
    out
}

/// Padding-free (`skip_padding`): every output of the real tokens is transformers', and the
/// hidden states are zeros at padded positions.
fn check_padding_free(
    name: &str,
    bare: bool,
    inputs: &BertInputs,
    expected: &HashMap<String, Tensor>,
) {
    let mask = inputs.attention_mask.unwrap();
    let seq = mask.dim(1).unwrap();
    assert!(
        lengths(mask).iter().any(|&length| length < seq),
        "{name}: the fixture's batch has no padding to skip"
    );
    let options = ForwardOptions::inference()
        .with_hidden_states()
        .with_skip_padding();
    let packed = run_with(name, DType::F32, inputs, bare, &options);
    let mut compared = 0;
    for (key, actual) in &packed {
        let Some(reference) = expected.get(key) else {
            continue;
        };
        let per_token = actual.rank() == 3 && actual.dims()[..2] == *mask.dims();
        if per_token {
            let real = real_tokens(actual, mask);
            assert_close(
                &format!("{name} {key} padding-free (real tokens)"),
                &real,
                &real_tokens(reference, mask),
                TOLERANCE,
            );
            if key.contains("hidden_state") {
                assert_eq!(
                    max_abs_diff(actual, &real),
                    0.0,
                    "{name} {key} padding-free: padded positions not zero"
                );
            }
        } else {
            assert_close(
                &format!("{name} {key} padding-free"),
                actual,
                reference,
                TOLERANCE,
            );
        }
        compared += 1;
    }
    assert!(
        compared >= 3,
        "{name}: only {compared} padding-free outputs compared"
    );
    assert!(!packed.keys().any(|k| k.starts_with("attentions")));
    // Asked for attentions too, the padded batch runs: the same outputs as without the option.
    let with_attentions = run_with(name, DType::F32, inputs, bare, &options.with_attentions());
    let padded = run(name, DType::F32, inputs, bare);
    assert_eq!(with_attentions.len(), padded.len());
    for (key, t) in &padded {
        assert_eq!(max_abs_diff(&with_attentions[key], t), 0.0, "{name} {key}");
    }
}

/// Compares every output to transformers' in f32, and f16/bf16 to our f32; then checks that each
/// sequence run alone gives its row of the padded batch.
fn check(name: &str, bare: bool) {
    let expected = outputs(name);
    let ids = &expected["input_ids"];
    let mask = &expected["attention_mask"];
    let types = &expected["token_type_ids"];
    let inputs = BertInputs::new(ids)
        .with_attention_mask(mask)
        .with_token_type_ids(types);

    let ours = run(name, DType::F32, &inputs, bare);
    let mut compared = 0;
    for (key, actual) in &ours {
        if let Some(reference) = expected.get(key) {
            assert_close(&format!("{name} {key}"), actual, reference, TOLERANCE);
            compared += 1;
        }
    }
    let heads = ["last_hidden_state", "logits", "prediction_logits"];
    assert!(
        heads
            .iter()
            .any(|k| ours.contains_key(*k) && expected.contains_key(*k)),
        "{name}: no head output compared"
    );
    assert!(compared >= 5, "{name}: only {compared} outputs compared");
    check_padding_free(name, bare, &inputs, &expected);

    for dtype in [DType::F16, DType::BF16] {
        let half = run(name, dtype, &inputs, bare);
        for (key, full) in &ours {
            if key.starts_with("attentions") {
                continue; // probabilities of padded keys are exactly 0 in both; compared above
            }
            assert_half_close(&format!("{name} {key} {dtype:?}"), &half[key], full);
        }
    }

    // Padding invariance: the real tokens of each row, alone, give the same result.
    let main_key = if ours.contains_key("logits") && !bare {
        "logits"
    } else {
        "last_hidden_state"
    };
    let main_key = if ours.contains_key("prediction_logits") && !bare {
        "prediction_logits"
    } else {
        main_key
    };
    for (i, length) in lengths(mask).into_iter().enumerate() {
        let (ids_i, mask_i, types_i) = (
            row(ids, i, length),
            row(mask, i, length),
            row(types, i, length),
        );
        let single = BertInputs::new(&ids_i)
            .with_attention_mask(&mask_i)
            .with_token_type_ids(&types_i);
        let alone = &run(name, DType::F32, &single, bare)[main_key];
        let batched = ours[main_key].narrow(0, i, 1).unwrap();
        let batched = if alone.rank() == 3 {
            batched.narrow(1, 0, length).unwrap()
        } else {
            batched
        };
        assert_close(
            &format!("{name} row {i} alone vs batched"),
            alone,
            &batched,
            1e-5,
        );
    }
}

#[test]
fn bert_model_absolute_positions_gelu() {
    check("tiny-absolute-gelu", false);
}

#[test]
fn bert_model_relative_key_gelu_new() {
    check("tiny-relative-key", false);
}

#[test]
fn bert_model_relative_key_query_relu() {
    check("tiny-relative-key-query", false);
}

#[test]
fn pretraining_mlm_and_nsp_silu() {
    check("tiny-pretraining", false);
}

#[test]
fn masked_lm_from_pytorch_bin_gelu_pytorch_tanh() {
    check("tiny-masked-lm-bin", false);
}

#[test]
fn masked_lm_with_untied_decoder() {
    check("tiny-masked-lm-untied", false);
}

#[test]
fn next_sentence_from_sharded_safetensors() {
    check("tiny-nsp-sharded", false);
}

#[test]
fn multi_label_classifier_uses_per_label_sigmoid() {
    check("tiny-multilabel", false);
    let files = ModelFiles::from_dir(fixture("tiny-multilabel")).unwrap();
    let model = load::<BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    assert_eq!(model.activation(), ClassifierActivation::Sigmoid);
    let expected = outputs("tiny-multilabel");
    let ids = &expected["input_ids"];
    let mask = &expected["attention_mask"];
    let probs = model
        .probabilities(
            &BertInputs::new(ids)
                .with_attention_mask(mask)
                .with_token_type_ids(&expected["token_type_ids"]),
        )
        .unwrap();
    let reference = candle_nn::ops::sigmoid(&expected["logits"]).unwrap();
    assert_close("multi-label probabilities", &probs, &reference, 1e-5);
}

#[test]
fn multi_class_classifier_uses_softmax() {
    check("tiny-classifier-softmax", false);
    let files = ModelFiles::from_dir(fixture("tiny-classifier-softmax")).unwrap();
    let model = load::<BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    assert_eq!(model.activation(), ClassifierActivation::Softmax);
    let expected = outputs("tiny-classifier-softmax");
    let inputs = BertInputs::new(&expected["input_ids"])
        .with_attention_mask(&expected["attention_mask"])
        .with_token_type_ids(&expected["token_type_ids"]);
    let probs = model.probabilities(&inputs).unwrap();
    let reference = candle_nn::ops::softmax_last_dim(&expected["logits"]).unwrap();
    assert_close("softmax probabilities", &probs, &reference, 1e-5);
}

/// Task checkpoints store the encoder under `bert.`; a bare BertModel reads it from there.
#[test]
fn bare_model_loads_from_prefixed_task_checkpoints() {
    for name in [
        "tiny-pretraining",
        "tiny-masked-lm-bin",
        "tiny-nsp-sharded",
        "tiny-multilabel",
    ] {
        check(name, true);
    }
}
