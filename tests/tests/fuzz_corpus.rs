//! The fuzz targets' committed inputs, replayed through the same functions the cargo-fuzz
//! targets call (`tests/fuzz/harness.rs`): the hand-written seeds (`tests/fuzz/seeds/TARGET/`)
//! and the minimised corpus the recorded runs kept (`tests/fuzz/corpus/TARGET/`). The short fuzz
//! smoke CI runs on stable. Each input must return without a panic (errors are fine).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

/// Every committed input of one target (seeds first), by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for kind in ["seeds", "corpus"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            assert!(kind == "corpus", "{}: no seeds", dir.display());
            continue;
        };
        let mut files: Vec<(String, Vec<u8>)> = entries
            .map(|entry| {
                let path = entry.unwrap().path();
                let name = format!("{kind}/{}", path.file_name().unwrap().to_string_lossy());
                (name, std::fs::read(&path).unwrap())
            })
            .collect();
        files.sort();
        assert!(kind == "corpus" || !files.is_empty(), "{target}: no seeds");
        inputs.extend(files);
    }
    inputs
}

/// Runs `call` on every input of `target`, naming the input that panics.
fn replay(target: &str, call: impl Fn(&[u8])) {
    for (name, data) in corpus(target) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(&data)));
        assert!(outcome.is_ok(), "{target}: input {name} panicked");
    }
}

#[test]
fn config_json_corpus() {
    replay("config_json", harness::config_json);
}

#[test]
fn safetensors_header_corpus() {
    let scratch = tempfile::tempdir().unwrap();
    replay("safetensors_header", |data| {
        harness::safetensors_header(data, scratch.path())
    });
}

#[test]
fn pair_file_corpus() {
    let scratch = tempfile::tempdir().unwrap();
    replay("pair_file", |data| harness::pair_file(data, scratch.path()));
}

#[test]
fn tokenize_forward_corpus() {
    let scorer = harness::tiny_scorer();
    replay("tokenize_forward", |data| {
        harness::tokenize_forward(data, &scorer)
    });
}
