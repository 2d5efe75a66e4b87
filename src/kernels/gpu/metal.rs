//! Shared host code of the Metal kernels (the `metal` feature): each op's [`Program`] compiled
//! once per device with fast math off, its pipelines cached; a tensor's buffer as a kernel input;
//! output buffers and dispatch sizes.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalDevice, MetalError, MetalStorage, Storage};
use candle_metal_kernels::metal::{Buffer, ComputePipeline, Library};
use candle_metal_kernels::BufferOffset;

use super::program::Program;

/// The pipeline of `kernel` in `program` on `device`: the program is compiled once per device
/// (fast math off: the kernels handle inf and NaN), each pipeline made once, both cached.
pub(crate) fn pipeline(
    device: &MetalDevice,
    program: &Program,
    kernel: &str,
) -> candle_core::Result<ComputePipeline> {
    type Id = candle_core::metal_backend::DeviceId;
    #[derive(Default)]
    struct Cache {
        libraries: HashMap<(Id, &'static str), Library>,
        pipelines: HashMap<(Id, String), ComputePipeline>,
    }
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = (device.id(), format!("{}::{kernel}", program.op));
    if let Some(pipeline) = cache.pipelines.get(&key) {
        return Ok(pipeline.clone());
    }
    let library = match cache.libraries.entry((device.id(), program.op)) {
        Entry::Occupied(library) => library.into_mut(),
        Entry::Vacant(slot) => {
            let options = objc2_metal::MTLCompileOptions::new();
            // Deprecated for `mathMode` (macOS 15+), which older systems lack; this works on
            // all.
            #[allow(deprecated)]
            options.setFastMathEnabled(false);
            let library = device
                .metal_device()
                .new_library_with_source(&program.source(), Some(&options))
                .map_err(MetalError::from)?;
            slot.insert(library)
        }
    };
    let function = library
        .get_function(kernel, None)
        .map_err(MetalError::from)?;
    let pipeline = device
        .metal_device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(MetalError::from)?;
    cache.pipelines.insert(key, pipeline.clone());
    Ok(pipeline)
}

/// A contiguous tensor storage's buffer and its start, as a kernel input (bound by reference in
/// `set_params!`, as an input for the encoder's hazard tracking).
pub(crate) fn input<'a>(
    storage: &'a MetalStorage,
    layout: &Layout,
) -> candle_core::Result<BufferOffset<'a>> {
    if !layout.is_contiguous() {
        candle_core::bail!("Metal kernel input must be contiguous");
    }
    Ok(BufferOffset {
        buffer: storage.buffer(),
        offset_in_bytes: layout.start_offset() * storage.dtype().size_in_bytes(),
    })
}

/// [`input`] of a tensor's storage, which must be on the Metal device.
pub(crate) fn storage_input<'a>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<BufferOffset<'a>> {
    let Storage::Metal(storage) = storage else {
        candle_core::bail!("Metal kernel input on another device")
    };
    input(storage, layout)
}

/// [`storage_input`] of an optional input (a guard from `Tensor::storage_and_layout`), else
/// `absent`: a buffer that stands in and is never read.
pub(crate) fn optional_input<'a, G: std::ops::Deref<Target = Storage>>(
    input: &'a Option<(G, &Layout)>,
    absent: &BufferOffset<'a>,
) -> candle_core::Result<BufferOffset<'a>> {
    match input {
        Some((guard, layout)) => storage_input(guard, layout),
        None => Ok(BufferOffset {
            buffer: absent.buffer,
            offset_in_bytes: absent.offset_in_bytes,
        }),
    }
}

/// A new buffer of `count` elements of `dtype` (at least one, for empty batches), to be
/// allocated before the encoder is taken: it holds the device's command lock.
pub(crate) fn output(
    device: &MetalDevice,
    count: usize,
    dtype: DType,
    label: &str,
) -> candle_core::Result<Arc<Buffer>> {
    device
        .new_buffer_builder()
        .with_size_for(count.max(1), dtype)
        .with_label(label)
        .build()
}

/// Threads per threadgroup for `pipeline`: `wanted`, or the most the pipeline takes (a multiple
/// of 32) when that is fewer. sapo's kernels stride over their rows, so any multiple of the SIMD
/// width gives the same results.
pub(crate) fn threads(pipeline: &ComputePipeline, wanted: u32) -> objc2_metal::MTLSize {
    let most = (pipeline.max_total_threads_per_threadgroup() / 32 * 32).max(32);
    size((wanted as usize).min(most))
}

/// A 1-D grid or threadgroup size.
pub(crate) fn size(width: usize) -> objc2_metal::MTLSize {
    objc2_metal::MTLSize {
        width,
        height: 1,
        depth: 1,
    }
}
