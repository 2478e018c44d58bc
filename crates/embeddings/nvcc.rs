// The nvcc steps of the build scripts that compile CUDA kernels: this crate's (build.rs) and
// bert-finetune's, which takes this file with `include!` (build scripts share no crate).

/// The compute capability in `CUDA_COMPUTE_CAP` (as candle's own kernels are built; e.g. 90
/// for H100/H200), after telling cargo which variables the kernels depend on.
fn compute_cap() -> u32 {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) => cap
            .trim()
            .replace('.', "")
            .parse()
            .unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={cap:?} is not a number like 90")),
        Err(_) => panic!(
            "the cuda feature needs CUDA_COMPUTE_CAP (e.g. 90 for H100/H200), as candle's kernels do"
        ),
    }
}

/// `nvcc --ptx` of `source` for `sm_{cap}` into `ptx`, then `--cubin` beside it: the PTX is
/// what ships (the driver compiles it when the kernels load), but only ptxas, which the cubin
/// build runs, checks a kernel's resources (static shared memory over 48 KiB, for one), so a
/// kernel that would fail to load on the GPU fails the build here instead.
fn compile(cap: u32, source: &str, ptx: &std::path::Path) {
    use std::path::PathBuf;
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|home| PathBuf::from(home).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for (mode, output) in [("--ptx", ptx.to_path_buf()), ("--cubin", ptx.with_extension("cubin"))] {
        let status = std::process::Command::new(&nvcc)
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
