//! Building blocks of the fused CPU kernels, written so that LLVM vectorizes them: loads from
//! the storage dtypes, lane arrays (`LANES` independent accumulators, so that sums vectorize
//! without reassociating floating-point additions — which also keeps the results bit-identical on
//! every machine), the tiles' matrix products ([`matmul`]), and the run-time choice of instruction set
//! ([`dispatch`], from the math layer's [`crate::vectorize`], which the masks' host passes use
//! too): the CPU kernels' `unsafe` code is here, in [`crate::vectorize`] and in
//! [`crate::kernels::memory`] (zeroed buffers advised as huge pages). The crate's other `unsafe`
//! sites are the CUDA host code's kernel launches (`kernels/*/cuda.rs`, under the `cuda` feature)
//! and the GPU parameters' bytes (`kernels/policy_loss/gpu.rs`, for the simulation), each with its
//! `SAFETY` comment.

use half::{bf16, f16};

use crate::kernels::memory::ZeroBits;
use crate::real::Real;
pub(crate) use crate::vectorize::{dispatch, Vectorized};

/// Independent accumulators per row: one AVX2 register of f32.
pub(crate) const LANES: usize = 8;

/// A storage element read as the compute type `R`.
pub(crate) trait Load<R>: Copy + Send + Sync {
    fn load(self) -> R;
}

/// A compute-type value written back as a storage element (whose zero is all zero bits, so
/// its output buffers can come from [`crate::kernels::memory::zeroed`]; the policy loss's
/// gradient, every value of which its kernel writes, comes from [`crate::kernels::memory::room`]).
pub(crate) trait Store<R>: Copy + Send + Sync + ZeroBits {
    fn store(value: R) -> Self;
}

macro_rules! load_store {
    ($elem:ty, $real:ty, |$x:ident| $load:expr, |$v:ident| $store:expr) => {
        impl Load<$real> for $elem {
            #[inline(always)]
            fn load(self) -> $real {
                let $x = self;
                $load
            }
        }
        impl Store<$real> for $elem {
            #[inline(always)]
            fn store($v: $real) -> Self {
                $store
            }
        }
    };
}
load_store!(f32, f32, |x| x, |v| v);
load_store!(f64, f64, |x| x, |v| v);
load_store!(f16, f32, |x| x.to_f32(), |v| f16::from_f32(v));
load_store!(bf16, f32, |x| x.to_f32(), |v| bf16::from_f32(v));

impl Load<f32> for u8 {
    #[inline(always)]
    fn load(self) -> f32 {
        self as f32
    }
}
impl Load<f64> for u8 {
    #[inline(always)]
    fn load(self) -> f64 {
        self as f64
    }
}

/// A row-major or strided matrix view: `rows × cols` values at `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<T> Matrix<'_, T> {
    /// Whether every element of the view lies inside `data`.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// `dst = (accumulate ? dst : 0) + lhs · rhs` with gemm. `dst` is row-major with
/// `dst_row_stride`; the shapes must agree and every view must lie inside its slice. With
/// `parallel`, gemm splits the output over rayon's threads (each output element is still summed
/// by one thread in a fixed order, so the bits do not depend on the thread count); callers that
/// parallelize over tiles themselves pass `false`.
pub(crate) fn matmul<T: Real>(
    dst: &mut [T],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Matrix<'_, T>,
    rhs: Matrix<'_, T>,
    parallel: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let out = Matrix {
        data: &[] as &[T],
        rows: m,
        cols: n,
        row_stride: dst_row_stride,
        col_stride: 1,
    };
    assert!(
        rhs.rows == k,
        "matmul: inner dimensions {k} and {}",
        rhs.rows
    );
    assert!(lhs.fits(lhs.data.len()) && rhs.fits(rhs.data.len()) && out.fits(dst.len()));
    if m == 0 || n == 0 {
        return;
    }
    let stride = |s: usize| s as isize;
    // SAFETY: the asserts above keep every element gemm reads (lhs, rhs) or writes (dst) inside
    // its slice, and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            stride(dst_row_stride),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.col_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.col_stride),
            stride(rhs.row_stride),
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// Adds a padded stream (one tile) into `LANES` lane sums: summed in the compute type within the
/// tile (vectorized, in a fixed order), then added to f64 lanes, so that long rows keep their
/// precision.
#[inline(always)]
pub(crate) fn lane_sum<R: Real>(v: &[R], acc: &mut [f64; LANES]) {
    let mut tile = [R::ZERO; LANES];
    for block in v.as_chunks::<LANES>().0 {
        for l in 0..LANES {
            tile[l] = tile[l] + block[l];
        }
    }
    for l in 0..LANES {
        acc[l] += tile[l].to_f64();
    }
}

/// Lane minima of a padded stream.
#[inline(always)]
pub(crate) fn lane_min<R: Real>(v: &[R], acc: &mut [R; LANES]) {
    for block in v.as_chunks::<LANES>().0 {
        for l in 0..LANES {
            acc[l] = acc[l].min_of(block[l]);
        }
    }
}

/// Lane maxima of a padded stream.
#[inline(always)]
pub(crate) fn lane_max<R: Real>(v: &[R], acc: &mut [R; LANES]) {
    for block in v.as_chunks::<LANES>().0 {
        for l in 0..LANES {
            acc[l] = acc[l].max_of(block[l]);
        }
    }
}

/// The lanes added in order.
#[inline(always)]
pub(crate) fn total(acc: &[f64; LANES]) -> f64 {
    acc.iter().sum()
}
