//! What the GPU path of the fused linear log-probs (`linear_log_probs.h` + GEMMs) takes, for the
//! CUDA and Metal host code and for the CPU simulation that tests it: the tiling and the
//! simulation's runs.

/// Rows per chunk and vocabulary ids per tile on CUDA: one `[2048, 8192]` f32 logits buffer
/// (64 MiB) at a time.
#[cfg(feature = "cuda")]
pub(crate) const CUDA_TILING: (usize, usize) = (2048, 8192);

/// Rows per chunk and vocabulary ids per tile on Metal: one `[1024, 8192]` f32 logits buffer
/// (32 MiB) at a time.
#[cfg(feature = "metal")]
pub(crate) const METAL_TILING: (usize, usize) = (1024, 8192);

/// A tile of the walk: rows `c0..c0 + c` × vocabulary ids `v0..v0 + w`.
#[cfg(any(feature = "cuda", feature = "metal"))]
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) c0: usize,
    pub(crate) c: usize,
    pub(crate) v0: usize,
    pub(crate) w: usize,
}

/// The walk both passes make over `n` rows × `v` ids, in order: chunks of `chunk` rows, each in
/// tiles of `tile` ids (the simulation driver `sim.cpp` walks the same way).
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn tiles(
    n: usize,
    v: usize,
    (chunk, tile): (usize, usize),
) -> impl Iterator<Item = Tile> {
    (0..n).step_by(chunk).flat_map(move |c0| {
        (0..v).step_by(tile).map(move |v0| Tile {
            c0,
            c: chunk.min(n - c0),
            v0,
            w: tile.min(v - v0),
        })
    })
}

/// The simulation's tiling: small, so that the tests cross chunk and tile boundaries.
#[cfg(feature = "gpu-sim")]
const SIM_TILING: (usize, usize) = (7, 64);

/// `(storage, layout)` of the hidden states, the weight and the bias (f32).
#[cfg(feature = "gpu-sim")]
pub(crate) type Storages<'a> = (
    (&'a candle_core::CpuStorage, &'a candle_core::Layout),
    (&'a candle_core::CpuStorage, &'a candle_core::Layout),
    (&'a candle_core::CpuStorage, &'a candle_core::Layout),
);

/// The simulation's input: mode, bias flag, block size, dims, tiling, `1/T`, then the data.
#[cfg(feature = "gpu-sim")]
use crate::kernels::gpu::sim;
#[cfg(feature = "gpu-sim")]
use candle_core::backend::BackendStorage;

#[cfg(feature = "gpu-sim")]
fn input(
    backward: bool,
    (hidden, weight, bias): Storages<'_>,
    targets: &candle_core::Tensor,
    (temperature, has_bias): (f64, bool),
) -> candle_core::Result<Vec<u8>> {
    use crate::kernels::log_probs::gpu::block_threads;
    let (n, h) = hidden.1.shape().dims2()?;
    let v = weight.1.shape().dims2()?.0;
    let mut out = Vec::new();
    let tile_width = SIM_TILING.1.min(v.max(1));
    for word in [
        u32::from(backward),
        u32::from(has_bias),
        block_threads(tile_width),
        0,
    ] {
        out.extend(word.to_le_bytes());
    }
    for dim in [n, h, v, SIM_TILING.0, SIM_TILING.1] {
        out.extend((dim as i64).to_le_bytes());
    }
    out.extend(((1.0 / temperature) as f32).to_le_bytes());
    for (storage, layout) in [hidden, weight, bias] {
        if storage.dtype() != candle_core::DType::F32 {
            candle_core::bail!("GPU simulation: the fused linear log-probs take f32");
        }
        out.extend(sim::storage_bytes(storage, layout)?);
    }
    out.extend(sim::tensor_bytes(
        &targets.to_dtype(candle_core::DType::I64)?,
    )?);
    Ok(out)
}

/// The forward run on the CPU by the simulation: `[3, N]` (f32).
#[cfg(feature = "gpu-sim")]
pub(crate) fn simulate_forward(
    target: sim::Target,
    inputs: Storages<'_>,
    targets: &candle_core::Tensor,
    options: (f64, bool),
) -> candle_core::Result<Vec<f32>> {
    let bytes = sim::run(
        &METAL_PROGRAM,
        target,
        &input(false, inputs, targets, options)?,
    )?;
    Ok(floats(&bytes))
}

/// The backward run on the CPU by the simulation: `[N·H + V·H + V]` (f32) from the packed
/// `[6, N]` forward output and upstream gradient.
#[cfg(feature = "gpu-sim")]
pub(crate) fn simulate_backward(
    target: sim::Target,
    inputs: Storages<'_>,
    targets: &candle_core::Tensor,
    options: (f64, bool),
    (packed, layout): (&candle_core::CpuStorage, &candle_core::Layout),
) -> candle_core::Result<Vec<f32>> {
    let mut bytes = input(true, inputs, targets, options)?;
    bytes.extend(sim::storage_bytes(packed, layout)?);
    Ok(floats(&sim::run(&METAL_PROGRAM, target, &bytes)?))
}

#[cfg(feature = "gpu-sim")]
fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The Metal program of these kernels (`metal.rs` compiles it; the simulation runs it).
#[cfg(any(feature = "metal", feature = "gpu-sim"))]
pub(crate) const METAL_PROGRAM: crate::kernels::gpu::program::Program =
    crate::kernels::gpu::program::Program {
        op: "linear_log_probs",
        files: &[
            crate::kernels::gpu::program::COMMON,
            crate::kernels::gpu::program::SOFTMAX,
            include_str!("linear_log_probs.h"),
            include_str!("linear_log_probs.metal"),
        ],
        includes: None,
    };
