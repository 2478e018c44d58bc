#![no_main]
#[path = "../harness.rs"]
mod harness;

use std::sync::OnceLock;

static SCRATCH: OnceLock<std::path::PathBuf> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::safetensors_header(data, SCRATCH.get_or_init(harness::scratch))
});
