//! Every kind of bad input in `tests/BAD_INPUT.md`, one test each (named after its row): the
//! typed error it gets and the words of its message. None of them may panic.

use std::fs;
use std::path::{Path, PathBuf};

use bert::limits::{MAX_DATASET_BYTES, MAX_TEXT_BYTES, MAX_TOKENS_PER_BATCH};
use bert::{
    load, BertModel, DType, Device, DeviceSpec, Embedder, Error, ModelFiles, ModelSource,
    PairFormat, PairScorer, PipelineOptions, ScoreMode,
};
use bert_finetune::{read_dataset, train, BadRows, Loss, TrainConfig};
use bert_tests::fixture;

fn cpu() -> PipelineOptions {
    PipelineOptions {
        device: DeviceSpec::Cpu,
        ..PipelineOptions::default()
    }
}

fn cross_encoder() -> PairScorer {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    PairScorer::from_files(&files, &cpu(), None).unwrap()
}

/// A copy of a fixture model directory to damage.
fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    let dir = into.join(name);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Sets one field of a model directory's `config.json`.
fn set_config(model: &Path, field: &str, value: serde_json::Value) {
    let path = model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    config[field] = value;
    fs::write(&path, config.to_string()).unwrap();
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// Every row of a pair file: the record or the error's message.
fn rows(path: &Path) -> Vec<Result<(u64, String, String), String>> {
    let format = PairFormat::from_path(path).unwrap();
    bert::read_pair_records(path, format)
        .unwrap()
        .map(|r| {
            r.map(|r| (r.line, r.text_a, r.text_b))
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn expect_err<T>(result: Result<T, impl std::fmt::Display>, words: &[&str]) -> String {
    let message = match result {
        Ok(_) => panic!("expected an error mentioning {words:?}"),
        Err(e) => e.to_string(),
    };
    for word in words {
        assert!(message.contains(word), "{message:?} lacks {word:?}");
    }
    message
}

fn dataset_error(path: &Path, words: &[&str]) {
    let result = read_dataset(path, None, Loss::BceWithLogits, 1, BadRows::Fail);
    let error = result.as_ref().expect_err("a bad row fails the read");
    assert!(
        matches!(
            error,
            bert_finetune::Error::Data { .. } | bert_finetune::Error::Load(Error::Data { .. })
        ),
        "{error:?}"
    );
    expect_err(result, words);
}

// --- texts given to the library --------------------------------------------------------------

#[test]
fn empty_text() {
    let result = cross_encoder().score(&[("a man", "")]);
    assert!(matches!(result, Err(Error::Input { .. })));
    expect_err(result, &["input pair 0 text_b", "is empty"]);
    // Asked for, it is encoded as transformers does ([CLS] a man [SEP] [SEP]) and scored.
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let lenient = PipelineOptions {
        allow_empty_texts: true,
        ..cpu()
    };
    let score = PairScorer::from_files(&files, &lenient, None)
        .unwrap()
        .score(&[("a man", "")])
        .unwrap()[0];
    assert!((0.0..=1.0).contains(&score), "{score}");
}

#[test]
fn whitespace_only_text() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let embedder = Embedder::from_files(&files, &cpu()).unwrap();
    let result = embedder.embed(&["a man", " \t\n "]);
    assert!(matches!(result, Err(Error::Input { .. })));
    expect_err(result, &["input text 1", "empty (or only whitespace)"]);
    let result = cross_encoder().rank("   ", &["a man"]);
    expect_err(result, &["input query", "empty"]);
}

#[test]
fn one_megabyte_text() {
    let scorer = cross_encoder();
    // 1 MB of words: tokenized whole, truncated to the model's 64 positions, scored.
    let megabyte = "the man ".repeat(1_000_000 / 8);
    let score = scorer.score(&[(&megabyte, "a woman")]).unwrap()[0];
    assert!((0.0..=1.0).contains(&score), "{score}");
    // Past the bound it is refused before tokenization.
    let over = "a".repeat(MAX_TEXT_BYTES + 1);
    let result = scorer.score(&[("a man", &over)]);
    assert!(matches!(result, Err(Error::Input { .. })));
    expect_err(
        result,
        &["pair 0 text_b", "1048577 bytes", "MAX_TEXT_BYTES"],
    );
    // Asked to refuse overflow instead of truncating, it names the length.
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let strict = PipelineOptions {
        error_on_overflow: true,
        ..cpu()
    };
    let result = PairScorer::from_files(&files, &strict, None)
        .unwrap()
        .score(&[(&megabyte, "a woman")]);
    assert!(matches!(result, Err(Error::Tokenize(_))));
    expect_err(result, &["tokens"]);
}

#[test]
fn nul_byte_in_text() {
    let result = cross_encoder().score(&[("a man\0", "a woman")]);
    expect_err(result, &["pair 0 text_a", "NUL byte at byte 5"]);
}

// --- pair files ------------------------------------------------------------------------------

#[test]
fn invalid_utf8_in_a_pair_file() {
    let dir = tempfile::tempdir().unwrap();
    for (name, good, bad) in [
        (
            "p.tsv",
            &b"a man\ta woman\n"[..],
            &b"a \xff man\ta woman\n"[..],
        ),
        ("p.csv", b"a man,a woman\n", b"a \xff man,a woman\n"),
        (
            "p.jsonl",
            b"{\"text_a\": \"a man\", \"text_b\": \"a woman\"}\n",
            b"{\"text_a\": \"a \xff man\", \"text_b\": \"a woman\"}\n",
        ),
    ] {
        let path = write(dir.path(), name, &[good, bad, good].concat());
        let rows = rows(&path);
        assert_eq!(rows.len(), 3, "{name}: {rows:?}");
        assert!(
            rows[0].is_ok() && rows[2].is_ok(),
            "{name}: the stream goes on: {rows:?}"
        );
        let message = rows[1].as_ref().unwrap_err();
        assert!(
            message.contains(&format!("{name}:2: invalid UTF-8")),
            "{name}: {message}"
        );
    }
}

#[test]
fn nul_byte_in_a_pair_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.tsv", b"a man\ta woman\na man\ta\0woman\n");
    let rows = rows(&path);
    let message = rows[1].as_ref().unwrap_err();
    assert!(
        message.contains("p.tsv:2: text_b has a NUL byte"),
        "{message}"
    );
}

#[test]
fn empty_text_in_a_pair_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.csv", b"text_a,text_b\na man,\"  \"\n");
    let message = rows(&path)[0].clone().unwrap_err();
    assert!(message.contains("p.csv:2: text_b is empty"), "{message}");
}

#[test]
fn missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "p.tsv", b"a man\ta woman\nonly one column\n");
    let message = rows(&path)[1].clone().unwrap_err();
    assert!(message.contains("p.tsv:2: expected 2 columns"), "{message}");
    assert!(message.contains("found 1"), "{message}");
    let path = write(
        dir.path(),
        "h.tsv",
        b"text_a\ttext_b\tlabel\na man\ta woman\n",
    );
    let message = rows(&path)[0].clone().unwrap_err();
    assert!(
        message.contains("h.tsv:2: expected at least 3 columns, found 2"),
        "{message}"
    );
    let path = write(dir.path(), "j.jsonl", b"{\"text_a\": \"a man\"}\n");
    let message = rows(&path)[0].clone().unwrap_err();
    assert!(
        message.contains("j.jsonl:1: missing \"text_b\""),
        "{message}"
    );
}

#[test]
fn extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    // Without a header, a fourth column cannot be placed.
    let path = write(dir.path(), "p.tsv", b"a man\ta woman\t1\textra\n");
    let message = rows(&path)[0].clone().unwrap_err();
    assert!(
        message.contains("p.tsv:1:") && message.contains("found 4"),
        "{message}"
    );
    // With a header, columns it does not name are ignored (documented).
    let path = write(
        dir.path(),
        "h.tsv",
        b"id\ttext_a\ttext_b\tlabel\n7\ta man\ta woman\t1\n",
    );
    assert_eq!(
        rows(&path),
        vec![Ok((2, "a man".to_string(), "a woman".to_string()))]
    );
}

#[test]
fn non_numeric_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.tsv",
        b"text_a\ttext_b\tlabel\na\tb\tsimilar\n",
    );
    dataset_error(&path, &["d.tsv:2", "label \"similar\" is not a number"]);
}

#[test]
fn nan_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.jsonl",
        b"{\"text_a\": \"a\", \"text_b\": \"b\", \"label\": \"NaN\"}\n",
    );
    dataset_error(&path, &["d.jsonl:1", "label NaN is not finite"]);
}

#[test]
fn out_of_range_label() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.csv", b"text_a,text_b,label\na,b,1.5\n");
    dataset_error(&path, &["d.csv:2", "label 1.5 is outside [0, 1]"]);
    let result = read_dataset(&path, None, Loss::CrossEntropy, 1, BadRows::Fail);
    expect_err(result, &["label 1.5 is not a class index below 1"]);
}

#[test]
fn missing_label_when_training() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.tsv", b"a man\ta woman\n");
    dataset_error(&path, &["d.tsv:1", "missing label"]);
}

#[test]
fn bad_rows_are_skipped_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.tsv",
        b"text_a\ttext_b\tlabel\na\tb\t0.5\na\t\t0.5\na\tb\tx\nc\td\t1\n",
    );
    let data = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Skip).unwrap();
    assert_eq!(data.pairs.len(), 2);
    assert_eq!(data.skipped.len(), 2);
    assert!(data.skipped[0].contains("d.tsv:3"), "{:?}", data.skipped);
    assert!(data.skipped[1].contains("d.tsv:4"), "{:?}", data.skipped);
}

#[test]
fn oversized_dataset_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.tsv");
    // A sparse file: the bound is checked on the size, before anything is read.
    fs::File::create(&path)
        .unwrap()
        .set_len(MAX_DATASET_BYTES + 1)
        .unwrap();
    let result = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Fail);
    assert!(matches!(result, Err(bert_finetune::Error::Setting(_))));
    expect_err(result, &["huge.tsv", "MAX_DATASET_BYTES"]);
}

// --- model files -----------------------------------------------------------------------------

#[test]
fn malformed_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    write(&model, "config.json", b"{\"hidden_size\": 32,");
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = files.read_config();
    assert!(matches!(
        result,
        Err(Error::Model(bert::ModelError::ConfigJson(_)))
    ));
    expect_err(result, &["config.json is not valid JSON"]);
}

#[test]
fn inconsistent_config_fields() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    set_config(&model, "num_attention_heads", 5.into()); // 32 is not a multiple of 5
    let result = ModelFiles::from_dir(&model).unwrap().read_config();
    assert!(matches!(
        result,
        Err(Error::Model(bert::ModelError::Config { .. }))
    ));
    expect_err(result, &["num_attention_heads"]);
}

#[test]
fn config_vocab_size_contradicts_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    set_config(&model, "vocab_size", 500.into());
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = load::<BertModel>(&files, DType::F32, &Device::Cpu);
    expect_err(result, &["word_embeddings.weight", "500"]);
}

#[test]
fn tokenizer_larger_than_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-cross-encoder", dir.path());
    // Shrink the declared vocabulary below the tokenizer's 83 tokens (and the weights to match
    // are not needed: the check comes first).
    set_config(&model, "vocab_size", 50.into());
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = PairScorer::from_files(&files, &cpu(), None);
    assert!(matches!(result, Err(Error::Checkpoint { .. })));
    expect_err(result, &["tokenizer has 83 tokens", "vocab_size is 50"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    let weights = model.join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = load::<BertModel>(&files, DType::F32, &Device::Cpu);
    assert!(matches!(result, Err(Error::Checkpoint { .. })));
    expect_err(
        result,
        &["model.safetensors", "not a readable safetensors file"],
    );
}

#[test]
fn corrupted_safetensors_header() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    let weights = model.join("model.safetensors");
    let mut bytes = fs::read(&weights).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    fs::write(&weights, &bytes).unwrap();
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = load::<BertModel>(&files, DType::F32, &Device::Cpu);
    assert!(matches!(result, Err(Error::Checkpoint { .. })));
    expect_err(result, &["not a readable safetensors file"]);
}

#[test]
fn tensor_of_the_wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-absolute-gelu", dir.path());
    let weights = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = tensors
        .keys()
        .find(|k| k.ends_with("word_embeddings.weight"))
        .unwrap()
        .clone();
    let as_ints = tensors[&name].to_dtype(DType::I64).unwrap();
    tensors.insert(name, as_ints);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = load::<BertModel>(&files, DType::F32, &Device::Cpu);
    expect_err(
        result,
        &[
            "word_embeddings.weight has dtype I64",
            "must be floating point",
        ],
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-cross-encoder", dir.path());
    fs::remove_file(model.join("tokenizer.json")).unwrap();
    let files = ModelFiles::from_dir(&model).unwrap();
    let result = PairScorer::from_files(&files, &cpu(), None);
    assert!(matches!(result, Err(Error::Checkpoint { .. })));
    expect_err(result, &["no tokenizer.json"]);
}

#[test]
fn cross_encoder_mode_on_a_model_without_a_trained_head() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let result = PairScorer::from_files(&files, &cpu(), Some(ScoreMode::CrossEncoder));
    expect_err(result, &["needs a trained BertForSequenceClassification"]);
}

// --- model inputs ----------------------------------------------------------------------------

#[test]
fn token_ids_beyond_the_vocabulary() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let model = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let ids = bert::Tensor::new(&[[1u32, 99]], &Device::Cpu).unwrap();
    let result = model.forward(
        &bert::BertInputs::new(&ids),
        &bert::ForwardOptions::inference(),
    );
    assert!(matches!(result, Err(bert::ModelError::Input(_))));
    expect_err(result, &["input_ids contains 99"]);
}

#[test]
fn more_positions_than_max_position_embeddings() {
    let files = ModelFiles::from_dir(fixture("tiny-absolute-gelu")).unwrap();
    let model = load::<BertModel>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let ids = bert::Tensor::zeros((1, 65), DType::U32, &Device::Cpu).unwrap();
    let result = model.forward(
        &bert::BertInputs::new(&ids),
        &bert::ForwardOptions::inference(),
    );
    assert!(matches!(result, Err(bert::ModelError::Input(_))));
    expect_err(result, &["max_position_embeddings"]);
    // The pipelines refuse a max_length past the position table up front.
    let options = PipelineOptions {
        max_length: Some(65),
        ..cpu()
    };
    let result = PairScorer::from_files(&files, &options, None);
    expect_err(result, &["max_length 65 exceeds the model's 64 positions"]);
}

// --- sources, devices, options ---------------------------------------------------------------

#[test]
fn unknown_model_name() {
    let result = "all-MiniLM-L12-v9".parse::<ModelSource>();
    assert!(matches!(result, Err(Error::UnknownModel { .. })));
    expect_err(result, &["unknown model \"all-MiniLM-L12-v9\""]);
}

#[test]
fn device_not_compiled_in() {
    if candle_core::utils::cuda_is_available() {
        return; // a CUDA build has it
    }
    let result = DeviceSpec::Cuda(0).open();
    assert!(matches!(result, Err(Error::Device(_))));
    expect_err(result, &["no CUDA support", "--features cuda"]);
    let result = "tpu".parse::<DeviceSpec>();
    expect_err(result, &["unknown device \"tpu\""]);
}

#[test]
fn oversized_inference_batch() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let options = PipelineOptions {
        max_tokens_per_batch: MAX_TOKENS_PER_BATCH + 1,
        ..cpu()
    };
    let result = PairScorer::from_files(&files, &options, None);
    assert!(matches!(result, Err(Error::InvalidOption(_))));
    expect_err(result, &["max_tokens_per_batch", "MAX_TOKENS_PER_BATCH"]);
}

#[test]
fn oversized_training_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.tsv",
        b"text_a\ttext_b\tlabel\na man\ta woman\t1\n",
    );
    let data = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Fail).unwrap();
    let base = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let cfg = TrainConfig {
        batch_size: 2048, // x 64 positions = 131072 tokens
        progress: false,
        ..TrainConfig::default()
    };
    let result = train(
        &base,
        &data,
        None,
        &dir.path().join("out"),
        &cfg,
        &Device::Cpu,
    );
    assert!(matches!(result, Err(bert_finetune::Error::Setting(_))));
    expect_err(
        result,
        &[
            "131072 tokens",
            "MAX_TRAIN_TOKENS_PER_BATCH",
            "gradient accumulation",
        ],
    );
}

#[test]
fn unwritable_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.tsv",
        b"text_a\ttext_b\tlabel\na man\ta woman\t1\n",
    );
    let data = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Fail).unwrap();
    let base = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    // A regular file where a directory must go: unwritable for any user, root included.
    let blocker = write(dir.path(), "blocker", b"");
    let cfg = TrainConfig {
        progress: false,
        ..TrainConfig::default()
    };
    let result = train(&base, &data, None, &blocker.join("out"), &cfg, &Device::Cpu);
    assert!(matches!(result, Err(bert_finetune::Error::Io { .. })));
    expect_err(result, &["blocker/out"]);
}

#[test]
fn non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("text_a\ttext_b\tlabel\n");
    for i in 0..32 {
        text += &format!("a man {}\ta woman\t{}\n", "is ".repeat(i % 5), i % 2);
    }
    let path = write(dir.path(), "d.tsv", text.as_bytes());
    let data = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Fail).unwrap();
    let base = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let out = dir.path().join("out");
    // A learning rate that overflows f32 within a few steps.
    let cfg = TrainConfig {
        lr: 1e36,
        warmup_ratio: 0.0,
        batch_size: 4,
        epochs: 3,
        eval_steps: Some(1),
        progress: false,
        ..TrainConfig::default()
    };
    let result = train(&base, &data, Some(&data), &out, &cfg, &Device::Cpu);
    let Err(bert_finetune::Error::NonFinite { step, batch, .. }) = result else {
        panic!("expected a non-finite loss error, got {result:?}");
    };
    let message = expect_err(result, &["at step", "training stopped"]);
    assert!(
        message.contains(&format!("step {step} (batch {batch})")),
        "{message}"
    );
    assert!(step >= 2, "step {step}: the first step has a finite loss");
    // The checkpoint of the step before is whole and loads.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("last/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], step - 1);
    let files = ModelFiles::from_dir(out.join("last")).unwrap();
    load::<bert::BertForSequenceClassification>(&files, DType::F32, &Device::Cpu).unwrap();
}
