//! With the `cuda` feature: compiles the GPU kernels (src/cuda/) to PTX with nvcc, for the
//! compute capability in `CUDA_COMPUTE_CAP` (as candle's own kernels are built; e.g. 90 for
//! H100/H200): the epilogues (bias + GELU, bias + residual + LayerNorm) for any, the fused
//! attention, whose tensor-core tiles need 8.0 or newer, from 8.0 on (below that it is left
//! out, cfg `bert_no_flash_attention`, and attention takes the plain path). Without the
//! feature this does nothing.

use std::path::PathBuf;

include!("nvcc.rs");

const EPILOGUES: &str = "src/cuda/epilogues.cu";
const ATTENTION: &str = "src/cuda/flash_attention.cu";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bert_no_flash_attention)");
    println!("cargo:rerun-if-changed=nvcc.rs");
    println!("cargo:rerun-if-changed={ATTENTION}");
    println!("cargo:rerun-if-changed={EPILOGUES}");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = compute_cap();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    compile(cap, EPILOGUES, &out.join("epilogues.ptx"));
    if cap < 80 {
        println!(
            "cargo:warning=CUDA_COMPUTE_CAP {cap} < 80: the fused attention kernel is left out"
        );
        println!("cargo:rustc-cfg=bert_no_flash_attention");
        return;
    }
    compile(cap, ATTENTION, &out.join("flash_attention.ptx"));
}
