//! With the `cuda` feature: compiles the GPU kernels (src/cuda/) to PTX with nvcc, for the
//! compute capability in `CUDA_COMPUTE_CAP` (as candle's own kernels are built; e.g. 90 for
//! H100/H200): the epilogues (bias + GELU, bias + residual + LayerNorm) for any, the fused
//! attention, whose tensor-core tiles need 8.0 or newer, from 8.0 on (below that it is left
//! out, cfg `bert_no_flash_attention`, and attention takes the plain path). Without the
//! feature this does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

const EPILOGUES: &str = "src/cuda/epilogues.cu";
const ATTENTION: &str = "src/cuda/flash_attention.cu";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(bert_no_flash_attention)");
    println!("cargo:rerun-if-changed={ATTENTION}");
    println!("cargo:rerun-if-changed={EPILOGUES}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap: u32 = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) => cap
            .trim()
            .replace('.', "")
            .parse()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={cap:?} is not a number like 90")),
        Err(_) => panic!(
            "the cuda feature needs CUDA_COMPUTE_CAP (e.g. 90 for H100/H200), as candle's kernels do"
        ),
    };
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

/// `nvcc --ptx` of `source` for `sm_{cap}` into `ptx`, then `--cubin` beside it: the PTX is
/// what ships (the driver compiles it when the kernels load), but only ptxas, which the cubin
/// build runs, checks a kernel's resources (static shared memory over 48 KiB, for one), so a
/// kernel that would fail to load on the GPU fails the build here instead.
fn compile(cap: u32, source: &str, ptx: &Path) {
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for (mode, output) in [
        ("--ptx", ptx.to_path_buf()),
        ("--cubin", ptx.with_extension("cubin")),
    ] {
        let status = Command::new(&nvcc)
            .args([mode, "-O3", "-std=c++17"])
            .arg(format!("--gpu-architecture=sm_{cap}"))
            .arg("-o")
            .arg(&output)
            .arg(source)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc {mode} failed on {source}");
    }
}
