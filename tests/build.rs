//! Compiles the GPU attention kernel's source under its CPU emulation (cuda_emulation/), so
//! the test suite checks the kernel's logic on machines without a GPU.

fn main() {
    let kernel = "../crates/embeddings/src/cuda/flash_attention.cu";
    println!("cargo:rerun-if-changed={kernel}");
    println!("cargo:rerun-if-changed=cuda_emulation/emulate.h");
    println!("cargo:rerun-if-changed=cuda_emulation/attention.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(true)
        .file("cuda_emulation/attention.cpp")
        .compile("cuda_emulation");
}
