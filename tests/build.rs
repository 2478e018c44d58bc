//! Compiles the GPU kernels' sources (crates/embeddings/src/cuda/) under their CPU emulation
//! (cuda_emulation/), so the test suite checks the kernels' logic on machines without a GPU.

fn main() {
    for path in [
        "../crates/embeddings/src/cuda/flash_attention.cu",
        "../crates/embeddings/src/cuda/epilogues.cu",
        "../crates/finetune/src/cuda/adamw.cu",
        "cuda_emulation/emulate.h",
        "cuda_emulation/attention.cpp",
        "cuda_emulation/epilogues.cpp",
        "cuda_emulation/adamw.cpp",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(true)
        // `#pragma unroll` is nvcc's; g++ ignores it and would say so for every loop.
        .flag_if_supported("-Wno-unknown-pragmas")
        .file("cuda_emulation/attention.cpp")
        .file("cuda_emulation/epilogues.cpp")
        .file("cuda_emulation/adamw.cpp")
        .compile("cuda_emulation");
}
