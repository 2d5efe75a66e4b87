//! For this crate's tests only (the internal `gpu-sim` feature; not part of the public API):
//! runs the CUDA and Metal kernel sources on the CPU. While a [`Simulation`] guard lives, a
//! [`crate::Backend::Fused`] call on CPU tensors of the GPU kernels' dtypes on this thread runs
//! the simulated GPU kernels (where an op has none, or for f64, the composed ops, as on a GPU);
//! dropping the guard ends it.
//!
//! ```
//! let _gpu = sapo::simulation::simulate(sapo::simulation::Gpu::Cuda);
//! // … `Backend::Fused` calls on the CPU run the CUDA sources here …
//! ```

use crate::kernels::gpu::sim::{self, Target};

/// Which GPU kernel sources the simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu {
    /// The `.cu` sources (warps of 32).
    Cuda,
    /// The `.metal` sources, SIMD groups of 32.
    Metal,
    /// The `.metal` sources, SIMD groups of 8 (they must not depend on the width).
    MetalSimd8,
}

/// Simulates `gpu` on this thread until dropped (then the previous state returns).
#[must_use = "the simulation ends when the guard is dropped"]
pub struct Simulation {
    previous: Option<Target>,
}

/// Runs `Backend::Fused` calls on this thread on the simulated `gpu` until the guard is dropped.
pub fn simulate(gpu: Gpu) -> Simulation {
    let target = match gpu {
        Gpu::Cuda => Target::Cuda,
        Gpu::Metal => Target::Metal { simd_width: 32 },
        Gpu::MetalSimd8 => Target::Metal { simd_width: 8 },
    };
    Simulation {
        previous: sim::set_current(Some(target)),
    }
}

impl Drop for Simulation {
    fn drop(&mut self) {
        sim::set_current(self.previous);
    }
}
