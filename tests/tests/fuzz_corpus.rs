//! The fuzz targets' committed corpora (`tests/fuzz/corpus/TARGET/`), replayed through the same
//! functions the cargo-fuzz targets call (`tests/fuzz/harness.rs`): the short fuzz smoke CI runs
//! on stable. Each input must return without a panic (errors are expected and fine).

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

/// Every input of one target's corpus, by file name; at least the seeds.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.iter().any(|(name, _)| name.starts_with("seed-")),
        "{target}: no seeds"
    );
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
