//! With the `cuda` feature, compiles `src/kernels.cu` and `src/mamba/scan.cu` to PTX with nvcc
//! (found on `PATH`, or under `CUDA_ROOT`/`CUDA_PATH`/`CUDA_HOME`, as
//! `../shared/gpu/build-cuda.sh` sets up) for the compute capability in `CUDA_COMPUTE_CAP`
//! (default 90, Hopper); `fused.rs` and `mamba/cuda.rs` embed them.
//! Without the feature this does nothing, so CI needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/kernels.cu");
    println!("cargo:rerun-if-changed=src/mamba/scan.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rustc-check-cfg=cfg(potluck_tf32)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // `fused.rs` runs split TF32 products only for GPUs with TF32 tensor cores (8.0 on).
    if cap.parse::<u32>().is_ok_and(|c| c >= 80) {
        println!("cargo:rustc-cfg=potluck_tf32");
    }
    let nvcc = ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for (src, ptx) in [
        ("src/kernels.cu", "potluck_kernels.ptx"),
        ("src/mamba/scan.cu", "potluck_mamba.ptx"),
    ] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(src)
            .arg("-o")
            .arg(out.join(ptx))
            .status()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src} ({status})");
    }
}
