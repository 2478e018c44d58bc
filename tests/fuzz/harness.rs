//! What each fuzz target does with its input; shared by the cargo-fuzz targets
//! (`tests/fuzz/fuzz_targets`) and the corpus replay test (`tests/tests/fuzz_corpus.rs`).
//! Every function must return (errors are fine) and never panic, whatever the bytes.

// Each target binary uses one of these functions, the replay test all of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bert::{
    load, BertModel, DType, Device, DeviceSpec, ModelFiles, PairFormat, PairScorer, PipelineOptions,
};

/// The tiny fixture models (32 hidden, 64 positions) the targets load.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(if env!("CARGO_PKG_NAME") == "bert-fuzz" {
            "../fixtures"
        } else {
            "fixtures"
        })
        .join(name)
}

/// A scratch directory of this process, for targets whose input is a file (the replay test
/// uses a temporary directory instead).
#[allow(dead_code)]
pub fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bert-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a writable temporary directory");
    dir
}

/// `config.json` parsing and validation.
pub fn config_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bert::Config::from_json_str(text);
    }
}

/// The bytes as `model.safetensors` beside the tiny model's config: opening the checkpoint
/// (header, offsets) and loading every weight from it.
pub fn safetensors_header(data: &[u8], scratch: &Path) {
    let dir = scratch.join("safetensors");
    let config = dir.join("config.json");
    if !config.is_file() {
        // Once, and with fs::write (which retries EINTR): fs::copy per input failed with
        // EINTR under libFuzzer's timer signal, a harness flake rather than a finding.
        let text = std::fs::read(fixture("tiny-absolute-gelu").join("config.json"))
            .expect("fixture config");
        std::fs::create_dir_all(&dir).expect("scratch");
        std::fs::write(&config, text).expect("scratch write");
    }
    std::fs::write(dir.join("model.safetensors"), data).expect("scratch write");
    if let Ok(files) = ModelFiles::from_dir(&dir) {
        let _ = load::<BertModel>(&files, DType::F32, &Device::Cpu);
    }
}

/// The bytes (after a first byte choosing TSV, CSV or JSONL) as a pair file: every record, and
/// the fine-tuning reader with bad rows skipped and failing.
pub fn pair_file(data: &[u8], scratch: &Path) {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let (name, format) = match choice % 3 {
        0 => ("pairs.tsv", PairFormat::Tsv),
        1 => ("pairs.csv", PairFormat::Csv),
        _ => ("pairs.jsonl", PairFormat::Jsonl),
    };
    let path = scratch.join(name);
    std::fs::write(&path, body).expect("scratch write");
    if let Ok(records) = bert::read_pair_records(&path, format) {
        for record in records {
            let _ = record;
        }
    }
    for (loss, labels, policy) in [
        (
            bert_finetune::Loss::BceWithLogits,
            1,
            bert_finetune::BadRows::Skip,
        ),
        (
            bert_finetune::Loss::CrossEntropy,
            3,
            bert_finetune::BadRows::Fail,
        ),
    ] {
        let _ = bert_finetune::read_dataset(&path, Some(format), loss, labels, policy);
    }
}

/// The tiny cross-encoder the tokenize + forward target scores with (loaded once).
pub fn tiny_scorer() -> PairScorer {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).expect("fixture");
    let options = PipelineOptions {
        device: DeviceSpec::Cpu,
        ..PipelineOptions::default()
    };
    PairScorer::from_files(&files, &options, None).expect("fixture loads")
}

/// Arbitrary bytes as text (lossy UTF-8), split at the first tab into a pair: tokenized and
/// scored both ways round in one batch (so padding is exercised too); every score that comes
/// back must be a probability.
pub fn tokenize_forward(data: &[u8], scorer: &PairScorer) {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\t').unwrap_or((&text, "x"));
    if let Ok(scores) = scorer.score(&[(a, b), (b, a)]) {
        assert!(
            scores.iter().all(|s| (0.0..=1.0).contains(s)),
            "not a probability: {scores:?}"
        );
    }
}
