//! LoRA adapters against PEFT (fixture: tests/fixtures/tiny-lora-peft, written by
//! tests/scripts/generate_lora_fixture.py with peft 0.21.2): a PEFT adapter loads on its base
//! with PEFT's logits, merged or not; every adapter and head gradient matches PEFT's; the base
//! stays frozen; and an adapter we write reloads, and merges into a plain checkpoint, with the
//! logits the trained model gave.

use std::collections::HashMap;

use bert::lora::{is_lora_weight, LoraConfig};
use bert::{
    load, BertForSequenceClassification, BertInputs, DType, Device, ForwardOptions, ModelFiles,
    ModelSource, Tensor,
};
use bert_finetune::{
    load_trainable, merge_adapter, write_model, AdamW, AdamWConfig, Loss, Trainable, Weights,
};
use bert_tests::{assert_close, assert_gradient_close, fixture, max_abs_diff, outputs};
use candle_core::safetensors::load as load_safetensors;

fn reference() -> HashMap<String, Tensor> {
    load_safetensors(
        fixture("tiny-lora-peft").join("lora_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn batch() -> HashMap<String, Tensor> {
    outputs("tiny-cross-encoder")
}

fn inputs(batch: &HashMap<String, Tensor>) -> BertInputs<'_> {
    BertInputs::new(&batch["input_ids"])
        .with_attention_mask(&batch["attention_mask"])
        .with_token_type_ids(&batch["token_type_ids"])
}

fn peft_files() -> ModelFiles {
    let spec = fixture("tiny-lora-peft").display().to_string();
    spec.parse::<ModelSource>().unwrap().fetch().unwrap()
}

fn logits_of(files: &ModelFiles) -> Tensor {
    let model = load::<BertForSequenceClassification>(files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let batch = batch();
    model
        .forward(&inputs(&batch), &ForwardOptions::inference())
        .unwrap()
        .logits
        .squeeze(1)
        .unwrap()
}

#[test]
fn a_peft_adapter_loads_on_its_base_with_peft_logits() {
    let files = peft_files();
    // The base is found from adapter_config.json (relative to the adapter directory).
    assert!(files.dir.ends_with("tiny-cross-encoder"), "{:?}", files.dir);
    let reference = reference();
    assert_close("logits", &logits_of(&files), &reference["logits"], 1e-5);
    assert_close(
        "PEFT's merged logits",
        &logits_of(&files),
        &reference["merged_logits"],
        1e-5,
    );
    // The adapter changes the outputs: the comparison above is not the base's logits again.
    let base = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    assert!(max_abs_diff(&logits_of(&base), &reference["logits"]) > 1e-2);
}

#[test]
fn adapter_and_head_gradients_match_peft_and_the_base_is_frozen() {
    let files = peft_files();
    let config = files.read_config().unwrap();
    let lora = LoraConfig::from_dir(&fixture("tiny-lora-peft")).unwrap();
    let trainable = load_trainable(
        &files,
        &config,
        Trainable::Lora(Box::new(lora)),
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap();
    assert!(trainable.params.iter().all(|p| !p.fresh));
    let batch = batch();
    let reference = reference();
    // Dropout is off in the fixture; inference mode keeps it off here.
    let logits = trainable
        .model
        .forward(&inputs(&batch), &ForwardOptions::inference())
        .unwrap()
        .logits;
    assert_close(
        "unmerged logits",
        &logits.squeeze(1).unwrap(),
        &reference["logits"],
        1e-5,
    );
    let loss = Loss::BceWithLogits
        .compute(&logits, &reference_labels())
        .unwrap();
    let expected_loss = reference["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss.to_scalar::<f32>().unwrap() - expected_loss).abs() < 1e-6);
    let grads = loss.backward().unwrap();

    let trained: Vec<_> = trainable.vars();
    let expected_count = reference.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(trained.len(), expected_count, "PEFT's trainable set");
    for param in trained {
        assert!(is_lora_weight(&param.name) || param.name.starts_with("classifier."));
        let expected = &reference[&format!("grad.{}", param.name)];
        let ours = grads
            .get(param.var.as_ref().unwrap().as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", param.name));
        assert_gradient_close(&param.name, ours, expected);
    }
    // Every base weight is a plain tensor: no gradient can reach it.
    for param in &trainable.params {
        if !(is_lora_weight(&param.name) || param.name.starts_with("classifier.")) {
            assert!(param.var.is_none(), "{} is trainable", param.name);
        }
    }
}

fn reference_labels() -> Tensor {
    load_safetensors(
        fixture("tiny-cross-encoder").join("gradients.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .remove("labels")
    .unwrap()
}

/// Trains fresh adapters for a step, writes them in PEFT's layout, and checks that the adapter
/// reloads (through its base's name) and merges into a plain checkpoint with the same logits,
/// leaving every weight without an adapter bit-identical to the base.
#[test]
fn an_adapter_we_write_reloads_and_merges_with_the_trained_logits() {
    let base_dir = fixture("tiny-cross-encoder");
    let base = ModelFiles::from_dir(&base_dir).unwrap();
    let config = base.read_config().unwrap();
    let mut lora = LoraConfig::new(4, 8.0, 0.1, &["query", "key", "value", "dense"]);
    lora.base_model_name_or_path = Some(base_dir.canonicalize().unwrap().display().to_string());
    let trainable = load_trainable(
        &base,
        &config,
        Trainable::Lora(Box::new(lora.clone())),
        DType::F32,
        &Device::Cpu,
        3,
    )
    .unwrap();
    // 2 layers x 6 linears + the pooler, A and B each, plus the classifier's weight and bias.
    assert_eq!(trainable.vars().len(), 13 * 2 + 2);
    let batch = batch();
    let mut optimizer = AdamW::new(
        &trainable.params,
        AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for _ in 0..2 {
        let logits = trainable
            .model
            .forward(&inputs(&batch), &ForwardOptions::training())
            .unwrap()
            .logits;
        let grads = Loss::BceWithLogits
            .compute(&logits, &reference_labels())
            .unwrap()
            .backward()
            .unwrap();
        optimizer.step(&grads, 1e-2).unwrap();
    }
    let trained = trainable
        .model
        .forward(&inputs(&batch), &ForwardOptions::inference())
        .unwrap()
        .logits
        .squeeze(1)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let adapter_dir = dir.path().join("adapter");
    let tensors = trainable.adapter_tensors();
    assert!(tensors.keys().all(|k| k.starts_with("base_model.model.")));
    assert!(
        tensors.contains_key("base_model.model.bert.encoder.layer.1.output.dense.lora_B.weight")
    );
    write_model(
        &adapter_dir,
        &config,
        Weights::Adapter(&lora, &tensors),
        &base,
        None,
    )
    .unwrap();
    let spec = adapter_dir.display().to_string();
    let files = spec.parse::<ModelSource>().unwrap().fetch().unwrap();
    assert_close("reloaded adapter", &logits_of(&files), &trained, 1e-5);
    assert!(
        max_abs_diff(&logits_of(&base), &trained) > 1e-4,
        "training moved nothing"
    );

    let merged_dir = dir.path().join("merged");
    merge_adapter(&files, &merged_dir).unwrap();
    let merged = ModelFiles::from_dir(&merged_dir).unwrap();
    assert!(merged.adapter.is_none());
    assert_close("merged checkpoint", &logits_of(&merged), &trained, 1e-5);
    let base_weights = load_safetensors(base_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let merged_weights =
        load_safetensors(merged_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.output.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.bias",
    ] {
        assert_eq!(
            max_abs_diff(&base_weights[name], &merged_weights[name]),
            0.0,
            "{name}"
        );
    }
    assert!(
        max_abs_diff(
            &base_weights["bert.encoder.layer.0.attention.self.query.weight"],
            &merged_weights["bert.encoder.layer.0.attention.self.query.weight"]
        ) > 0.0
    );
}

#[test]
fn unsupported_or_broken_adapters_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture("tiny-cross-encoder").canonicalize().unwrap();
    let write = |name: &str, config: serde_json::Value| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), config.to_string()).unwrap();
        std::fs::copy(
            fixture("tiny-lora-peft").join("adapter_model.safetensors"),
            d.join("adapter_model.safetensors"),
        )
        .unwrap();
        d.display().to_string()
    };
    let good = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"],
        "modules_to_save": ["classifier"], "base_model_name_or_path": base.display().to_string(),
    });
    let error = |spec: String| -> String {
        match spec.parse::<ModelSource>().and_then(|s| s.fetch()) {
            Ok(files) => load::<BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string()),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(error(write("good", good.clone())), "");
    let cases = [
        ("dora", "use_dora", serde_json::json!(true), "use_dora"),
        ("rank0", "r", serde_json::json!(0), "rank"),
        ("bias", "bias", serde_json::json!("all"), "bias"),
        (
            "regex",
            "target_modules",
            serde_json::json!(".*query"),
            "pattern",
        ),
        (
            "ranks",
            "rank_pattern",
            serde_json::json!({"query": 8}),
            "per-module ranks",
        ),
        ("ia3", "peft_type", serde_json::json!("IA3"), "only LORA"),
        (
            "nobase",
            "base_model_name_or_path",
            serde_json::Value::Null,
            "which model it adapts",
        ),
        ("rank8", "r", serde_json::json!(8), "shape [4, 32]"),
        (
            "fc",
            "target_modules",
            serde_json::json!(["fc1"]),
            "match no linear layer",
        ),
    ];
    for (name, key, value, expected) in cases {
        let mut config = good.clone();
        config[key] = value;
        let message = error(write(name, config));
        assert!(message.contains(expected), "{name}: {message}");
    }
    // A bare adapter directory is not a whole model.
    let message = ModelFiles::from_dir(fixture("tiny-lora-peft"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("LoRA adapter"), "{message}");
}
