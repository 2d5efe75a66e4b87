//! Compiles the CUDA kernels to PTX, only under the `cuda` feature (which already needs nvcc for
//! candle's own kernels): `nvcc --ptx -arch=compute_80`, portable PTX that the driver compiles
//! for sm_80, sm_90 and newer. nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the
//! PATH.

use std::path::PathBuf;
use std::process::Command;

/// The kernel sources, by op folder.
const KERNELS: [&str; 3] = ["linear_log_probs", "log_probs", "policy_loss"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels/gpu/common.h");
    println!("cargo::rerun-if-changed=src/kernels/gpu/softmax.h");
    // The objectives' device functions (`losses/<name>.h`, included by the generated
    // `policy_loss/objectives.h`).
    println!("cargo::rerun-if-changed=src/losses");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    for op in KERNELS {
        let source = format!("src/kernels/{op}/{op}.cu");
        println!("cargo::rerun-if-changed={source}");
        println!("cargo::rerun-if-changed=src/kernels/{op}/{op}.h");
        println!("cargo::rerun-if-changed=src/kernels/{op}");
        let ptx = out_dir.join(format!("{op}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-o"])
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {source}");
    }
}
