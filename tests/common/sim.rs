//! The GPU a test path simulates: under the internal `gpu-sim` feature, a path's
//! `Backend::Fused` calls run the CUDA or Metal kernel sources on the CPU while the guard of
//! [`Sim::enter`] lives (`sapo::simulation`); without it, nothing.

/// A path's simulated GPU, if any.
#[derive(Debug, Clone, Copy)]
pub struct Sim {
    #[cfg(feature = "gpu-sim")]
    gpu: Option<sapo::simulation::Gpu>,
}

/// While alive, this thread simulates the path's GPU.
pub struct Entered {
    #[cfg(feature = "gpu-sim")]
    _guard: Option<sapo::simulation::Simulation>,
}

#[allow(dead_code)]
impl Sim {
    /// No simulation: the path runs as its backend says.
    pub fn none() -> Sim {
        Sim {
            #[cfg(feature = "gpu-sim")]
            gpu: None,
        }
    }

    /// The simulated `gpu`.
    #[cfg(feature = "gpu-sim")]
    pub fn gpu(gpu: sapo::simulation::Gpu) -> Sim {
        Sim { gpu: Some(gpu) }
    }

    /// Simulates the path's GPU on this thread until the guard is dropped.
    pub fn enter(&self) -> Entered {
        Entered {
            #[cfg(feature = "gpu-sim")]
            _guard: self.gpu.map(sapo::simulation::simulate),
        }
    }
}

/// Every path a policy loss runs on: `(name, backend, simulated GPU)` — the fused CPU kernel,
/// the composed ops and, under `gpu-sim`, the CUDA and Metal sources simulated.
#[allow(dead_code)]
pub fn paths() -> Vec<(&'static str, sapo::Backend, Sim)> {
    use sapo::Backend;
    #[allow(unused_mut)]
    let mut all = vec![
        ("fused", Backend::Auto, Sim::none()),
        ("composed", Backend::Composed, Sim::none()),
    ];
    #[cfg(feature = "gpu-sim")]
    all.extend([
        (
            "simulated-cuda",
            Backend::Fused,
            Sim::gpu(sapo::simulation::Gpu::Cuda),
        ),
        (
            "simulated-metal",
            Backend::Fused,
            Sim::gpu(sapo::simulation::Gpu::Metal),
        ),
    ]);
    all
}
