#![no_main]
#[path = "../harness.rs"]
mod harness;

use std::sync::OnceLock;

static SCORER: OnceLock<bert::PairScorer> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::tokenize_forward(data, SCORER.get_or_init(harness::tiny_scorer))
});
