//! Shared pieces of the GPU kernels: `common.h` (the common subset of CUDA C++ and MSL the
//! kernels are written in: address spaces, the thread's place, shuffles, barriers, storage loads
//! and stores, deterministic block reductions), `softmax.h` (the online softmax), `shim.h` (the
//! CPU stand-in for the CUDA and Metal execution models); the host helpers of each backend
//! ([`cuda`], [`metal`]); the Metal programs ([`program`]: each op's MSL as one string); and behind the `gpu-sim` feature, [`sim`]: the runner that compiles a
//! kernel's `.cu` or `.metal` source with g++ and the shim and runs it on the CPU, so that the
//! tests compare the GPU kernels with the CPU kernels on any machine.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "metal")]
pub(crate) mod metal;
#[cfg(any(feature = "metal", feature = "gpu-sim"))]
pub(crate) mod program;
#[cfg(feature = "gpu-sim")]
pub(crate) mod sim;
