//! Host-side helpers every CUDA op shares: contiguous views of candle's CUDA storages.

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Storage};

/// The contiguous view of a CUDA storage under `layout`.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("a sapo CUDA kernel's input must be contiguous".into())
    })?;
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// As [`view`], for a tensor's storage (`Tensor::storage_and_layout`), which must be on CUDA.
pub(crate) fn storage_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Storage::Cuda(cuda) = storage else {
        candle_core::bail!("a sapo CUDA kernel's input is not on the CUDA device")
    };
    view(cuda, layout)
}
