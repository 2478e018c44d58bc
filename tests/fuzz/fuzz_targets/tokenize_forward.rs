#![no_main]
#[path = "../harness.rs"]
mod harness;

use std::sync::OnceLock;

static SCORER: OnceLock<bert::PairScorer> = OnceLock::new();
/// One worker, entered once per input: the kernels' parallel loops then run inline on it
/// instead of handing every small op to another thread (a wake-up each, ~30 inputs/s).
static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let pool = POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool")
    });
    pool.install(|| harness::tokenize_forward(data, SCORER.get_or_init(harness::tiny_scorer)))
});
