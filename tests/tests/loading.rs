//! Checkpoint loading: name resolution, missing tensors, tied decoders, shapes, bad files.

use std::collections::HashMap;
use std::path::Path;

use bert::{
    load, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertInputs,
    BertModel, Checkpoint, DType, Device, Error, ForwardOptions, ModelFiles, Tensor,
};
use bert_tests::{assert_close, fixture, outputs};

/// Copies a fixture's config and rewrites its weights through `edit` into a new directory.
fn rewritten(name: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(name).join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn logits_of_classifier(dir: &Path) -> Tensor {
    let expected = outputs("tiny-multilabel");
    let inputs = BertInputs::new(&expected["input_ids"])
        .with_attention_mask(&expected["attention_mask"])
        .with_token_type_ids(&expected["token_type_ids"]);
    let files = ModelFiles::from_dir(dir).unwrap();
    let model = load::<BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    model
        .forward(&inputs, &ForwardOptions::inference())
        .unwrap()
        .logits
}

#[test]
fn every_missing_tensor_is_listed() {
    let dir = rewritten("tiny-absolute-gelu", |t| {
        t.remove("encoder.layer.1.attention.self.key.weight")
            .unwrap();
        t.remove("embeddings.LayerNorm.bias").unwrap();
    });
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    match load::<BertModel>(&files, DType::F32, &Device::Cpu) {
        Err(Error::MissingTensors {
            names,
            architecture,
            ..
        }) => {
            assert_eq!(architecture, "BertModel");
            assert_eq!(
                names,
                vec![
                    "embeddings.LayerNorm.bias",
                    "encoder.layer.1.attention.self.key.weight"
                ]
            );
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
    let message = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("encoder.layer.1.attention.self.key.weight")
            && message.contains("2 tensor(s)"),
        "{message}"
    );
}

#[test]
fn unprefixed_task_checkpoint_loads() {
    let dir = rewritten("tiny-multilabel", |t| {
        let renamed: HashMap<_, _> = t
            .drain()
            .map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v))
            .collect();
        assert!(renamed.contains_key("encoder.layer.0.output.dense.weight"));
        *t = renamed;
    });
    assert_close(
        "unprefixed logits",
        &logits_of_classifier(dir.path()),
        &outputs("tiny-multilabel")["logits"],
        5e-5,
    );
}

#[test]
fn tf_era_layer_norm_names_load() {
    let dir = rewritten("tiny-multilabel", |t| {
        let renamed: HashMap<_, _> = t
            .drain()
            .map(|(k, v)| {
                (
                    k.replace("LayerNorm.weight", "LayerNorm.gamma")
                        .replace("LayerNorm.bias", "LayerNorm.beta"),
                    v,
                )
            })
            .collect();
        *t = renamed;
    });
    assert_close(
        "gamma/beta logits",
        &logits_of_classifier(dir.path()),
        &outputs("tiny-multilabel")["logits"],
        5e-5,
    );
}

#[test]
fn tied_decoder_is_filled_from_word_embeddings() {
    // transformers drops the shared decoder matrix when saving safetensors.
    let files = ModelFiles::from_dir(fixture("tiny-pretraining")).unwrap();
    let checkpoint = Checkpoint::open(&files.weights).unwrap();
    assert!(checkpoint.shape("cls.predictions.decoder.weight").is_none());
    assert!(load::<BertForPreTraining>(&files, DType::F32, &Device::Cpu).is_ok());

    // Untied, the decoder must be stored: without it loading fails and names it.
    let dir = rewritten("tiny-masked-lm-untied", |t| {
        t.remove("cls.predictions.decoder.weight").unwrap();
    });
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    match load::<BertForMaskedLM>(&files, DType::F32, &Device::Cpu) {
        Err(Error::MissingTensors { names, .. }) => {
            assert_eq!(names, vec!["cls.predictions.decoder.weight"])
        }
        other => panic!("expected MissingTensors, got {other:?}"),
    }
}

#[test]
fn unused_tensors_are_reported_not_loaded() {
    let files = ModelFiles::from_dir(fixture("tiny-pretraining")).unwrap();
    let loaded = load::<BertModel>(&files, DType::F32, &Device::Cpu).unwrap();
    assert!(loaded.model.pooler().is_some());
    assert!(!loaded.report.unused.is_empty());
    assert!(
        loaded.report.unused.iter().all(|n| n.starts_with("cls.")),
        "{:?}",
        loaded.report.unused
    );
}

#[test]
fn config_that_contradicts_the_weights_is_an_error_naming_the_tensor() {
    let dir = rewritten("tiny-absolute-gelu", |_| {});
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"vocab_size\": 99", "\"vocab_size\": 100"),
    )
    .unwrap();
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    let message = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("embeddings.word_embeddings.weight")
            && message.contains("[99, 32]")
            && message.contains("[100, 32]"),
        "{message}"
    );
}

#[test]
fn incomplete_or_corrupt_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let message = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    assert!(message.contains("no config.json"), "{message}");

    std::fs::copy(
        fixture("tiny-absolute-gelu").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let message = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("no weights found") && message.contains("model.safetensors"),
        "{message}"
    );

    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    let message = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("not a readable safetensors file"),
        "{message}"
    );

    let message = ModelFiles::from_dir(dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("not a directory"), "{message}");
}

#[test]
fn bad_inputs_are_typed_errors_not_panics() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let model = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let run = |ids: &Tensor| model.forward(&BertInputs::new(ids), &ForwardOptions::inference());
    let past_vocab = Tensor::new(&[[1u32, 99]], &Device::Cpu).unwrap();
    let message = run(&past_vocab).unwrap_err().to_string();
    assert!(message.contains("input_ids contains 99"), "{message}");
    let too_long = Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
    let message = run(&too_long).unwrap_err().to_string();
    assert!(message.contains("max_position_embeddings"), "{message}");
    let flat = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(run(&flat).unwrap_err().to_string().contains("[batch, seq]"));
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let bad_types = Tensor::new(&[[0u32, 2]], &Device::Cpu).unwrap();
    let message = model
        .forward(
            &BertInputs::new(&ids).with_token_type_ids(&bad_types),
            &ForwardOptions::inference(),
        )
        .unwrap_err()
        .to_string();
    assert!(message.contains("token_type_ids contains 2"), "{message}");
    let bad_mask = Tensor::new(&[[1u32, 1, 1]], &Device::Cpu).unwrap();
    let message = model
        .forward(
            &BertInputs::new(&ids).with_attention_mask(&bad_mask),
            &ForwardOptions::inference(),
        )
        .unwrap_err()
        .to_string();
    assert!(message.contains("attention_mask"), "{message}");
    let float_ids = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    assert!(run(&float_ids)
        .unwrap_err()
        .to_string()
        .contains("integer dtype"));
    // Padding-free, a bad id or segment in a padded position is refused as the padded pass
    // refuses it, a grid past the positions is still too long, and a mask of another shape is
    // named.
    let padding_free = ForwardOptions::inference().with_skip_padding();
    let run_padding_free = |ids: &Tensor, mask: &Tensor, types: Option<&Tensor>| {
        let inputs = BertInputs::new(ids).with_attention_mask(mask);
        let inputs = match types {
            Some(types) => inputs.with_token_type_ids(types),
            None => inputs,
        };
        model
            .forward(&inputs, &padding_free)
            .unwrap_err()
            .to_string()
    };
    let mask = Tensor::new(&[[1u32, 0], [1, 1]], &Device::Cpu).unwrap();
    let past_vocab_in_padding = Tensor::new(&[[1u32, 99], [1, 2]], &Device::Cpu).unwrap();
    let message = run_padding_free(&past_vocab_in_padding, &mask, None);
    assert!(message.contains("input_ids contains 99"), "{message}");
    let pair_ids = Tensor::new(&[[1u32, 2], [1, 2]], &Device::Cpu).unwrap();
    let bad_types_in_padding = Tensor::new(&[[0u32, 2], [0, 0]], &Device::Cpu).unwrap();
    let message = run_padding_free(&pair_ids, &mask, Some(&bad_types_in_padding));
    assert!(message.contains("token_type_ids contains 2"), "{message}");
    let long_ids = Tensor::zeros((2, 65), DType::U32, &Device::Cpu).unwrap();
    let long_mask = Tensor::cat(
        &[
            Tensor::ones((2, 1), DType::U32, &Device::Cpu).unwrap(),
            Tensor::zeros((2, 64), DType::U32, &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let message = run_padding_free(&long_ids, &long_mask, None);
    assert!(message.contains("max_position_embeddings"), "{message}");
    let short_mask = Tensor::new(&[[1u32, 0]], &Device::Cpu).unwrap();
    let message = run_padding_free(&pair_ids, &short_mask, None);
    assert!(message.contains("attention_mask"), "{message}");
    for (positions, words) in [
        (
            Tensor::new(&[[0u32, 64], [0, 1]], &Device::Cpu).unwrap(),
            "position_ids contains 64",
        ),
        (
            Tensor::new(&[[0u32, 1, 2]], &Device::Cpu).unwrap(),
            "position_ids must be",
        ),
    ] {
        let inputs = BertInputs::new(&pair_ids)
            .with_attention_mask(&mask)
            .with_position_ids(&positions);
        let message = model
            .forward(&inputs, &padding_free)
            .unwrap_err()
            .to_string();
        assert!(message.contains(words), "{message}");
    }
    // Empty batches and empty sequences never reach a kernel that would divide by them.
    for shape in [(0usize, 3usize), (2, 0)] {
        let empty = Tensor::zeros(shape, DType::U32, &Device::Cpu).unwrap();
        if let Ok(out) = run(&empty) {
            assert_eq!(out.last_hidden_state.dims(), &[shape.0, shape.1, 32]);
        }
    }
}

#[test]
fn dropout_is_active_only_in_training() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let model = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let expected = outputs("tiny-absolute-gelu");
    let inputs =
        BertInputs::new(&expected["input_ids"]).with_attention_mask(&expected["attention_mask"]);
    let eval_a = model
        .forward(&inputs, &ForwardOptions::inference())
        .unwrap()
        .last_hidden_state;
    let eval_b = model
        .forward(&inputs, &ForwardOptions::inference())
        .unwrap()
        .last_hidden_state;
    assert_close("inference is deterministic", &eval_a, &eval_b, 0.0);
    let train = model
        .forward(&inputs, &ForwardOptions::training())
        .unwrap()
        .last_hidden_state;
    let diff = bert_tests::max_abs_diff(&train, &eval_a);
    assert!(
        diff > 1e-2,
        "training forward equals inference (diff {diff}): dropout did nothing"
    );
}
