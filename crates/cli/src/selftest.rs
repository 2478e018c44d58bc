//! `bert selftest`'s reference, compiled in so the command runs where only the binary was
//! carried (a GPU machine); the checks are [`bert::selftest`]'s.

use std::collections::HashMap;

use anyhow::{Context, Result};
use bert::{Device, Tensor};

/// transformers' outputs for all-MiniLM-L6-v2 (input ids, masks, token types and results),
/// written by `tests/scripts/generate_fixtures.py`.
const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/minilm/outputs.safetensors");

/// The compiled-in fixture's tensors, on the CPU.
pub fn fixture() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(FIXTURE, &Device::Cpu)
        .context("reading the compiled-in fixture")
}
