//! With the `cuda` feature: compiles the GPU kernel of the optimiser (src/cuda/adamw.cu: the
//! fused AdamW update) to PTX with nvcc, as bert-embeddings' build script does its kernels
//! (the same steps, from its nvcc.rs). Without the feature this does nothing.

use std::path::PathBuf;

include!("../embeddings/nvcc.rs");

const ADAMW: &str = "src/cuda/adamw.cu";

fn main() {
    println!("cargo:rerun-if-changed=../embeddings/nvcc.rs");
    println!("cargo:rerun-if-changed={ADAMW}");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = compute_cap();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    compile(cap, ADAMW, &out.join("adamw.ptx"));
}
