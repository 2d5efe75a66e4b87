//! Shared pieces of the GPU kernels: `common.cuh` (storage loads and stores, deterministic block
//! reductions), `shim.h` (the CPU stand-in for the CUDA execution model) and, behind the
//! `gpu-sim` feature, [`sim`]: the runner that compiles a kernel's `.cu` source with g++ and the
//! shim and runs it on the CPU, so that the tests compare the GPU kernels with the CPU kernels on
//! any machine.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "gpu-sim")]
pub(crate) mod sim;
