//! The checks every layer shares: mask values (only 0 and 1), finite values where the mask
//! keeps them, and the compute dtype of an input dtype. Each reads the host once and returns a
//! typed error naming the argument.
//!
//! Layer: math.

use candle_core::{DType, Storage, Tensor, WithDType};

use crate::error::{check_device, check_float, check_shape, check_value, Error, Result};

/// f64 stays f64, everything else is computed in f32.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Number of elements of `mask` that are neither 0 nor 1, as a scalar tensor.
pub(crate) fn bad_mask_count(mask: &Tensor) -> Result<Tensor> {
    // Compared in the mask's own dtype, counted in f32 (a u8 count would wrap at 256).
    let not = |v: f64| -> Result<Tensor> { Ok(mask.ne(v)?.to_dtype(DType::F32)?) };
    Ok(not(0.0)?.mul(&not(1.0)?)?.sum_all()?)
}

/// Checks, in the mask's own dtype, that it holds only 0 and 1 (one host read).
pub(crate) fn check_mask_values(mask: &Tensor) -> Result<()> {
    let bad = bad_mask_count(mask)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if bad > 0.0 {
        return Err(mask_error(bad));
    }
    Ok(())
}

/// [`check_mask_values`] on values already on the host: the mask's typed error when it holds
/// a value other than 0 and 1 (one parallel pass over the slice).
pub(crate) fn check_host_mask_values<M: MaskValue>(mask: &[M]) -> Result<()> {
    let bad: usize = crate::pool::chunks(mask, crate::pool::CHUNK, |_, part| {
        part.iter().filter(|m| !m.binary()).count()
    })
    .into_iter()
    .sum();
    if bad > 0 {
        return Err(mask_error(bad as f64));
    }
    Ok(())
}

/// Converts a mask to `dtype` and checks that it holds only 0 and 1 (one host read).
pub(crate) fn checked_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    check_mask_values(mask)?;
    Ok(mask.to_dtype(dtype)?)
}

/// The error of a mask with `bad` values other than 0 and 1.
pub(crate) fn mask_error(bad: f64) -> Error {
    Error::InvalidValue {
        arg: "mask",
        expected: "only 0 and 1".into(),
        actual: format!("{bad} other values"),
    }
}

/// Number of unmasked non-finite values of `x`, as a scalar tensor.
pub(crate) fn unmasked_non_finite(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    // NaN fails `< inf` as well.
    let finite = x.abs()?.lt(f64::INFINITY)?.to_dtype(mask.dtype())?;
    Ok(mask.mul(&(1.0 - finite)?)?.sum_all()?)
}

/// [`unmasked_non_finite`] read back to the host.
fn count_non_finite(x: &Tensor, mask: &Tensor) -> Result<f64> {
    Ok(unmasked_non_finite(x, mask)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// Errors when `x` has a non-finite value where `mask` (a float 0/1 tensor) is 1 (one host read).
pub(crate) fn check_finite_where(arg: &'static str, x: &Tensor, mask: &Tensor) -> Result<()> {
    let bad = count_non_finite(x, mask)?;
    if bad > 0.0 {
        return Err(non_finite_error(arg, bad));
    }
    Ok(())
}

/// Errors when `x`, an input without a mask (`[B]` scores, a KL penalty's log-probs), has a
/// non-finite value (one host read).
pub(crate) fn check_finite(arg: &'static str, x: &Tensor) -> Result<()> {
    let bad = count_non_finite(x, &x.ones_like()?)?;
    if bad > 0.0 {
        return Err(Error::InvalidValue {
            arg,
            expected: "finite values".into(),
            actual: format!("{bad} non-finite"),
        });
    }
    Ok(())
}

/// The error of `bad` non-finite values of `arg` at unmasked positions.
fn non_finite_error(arg: &'static str, bad: f64) -> Error {
    Error::InvalidValue {
        arg,
        expected: "finite values at unmasked positions".into(),
        actual: format!("{bad} non-finite"),
    }
}

/// Checks that `x` is a float tensor of `shape` on `device`'s device.
pub(crate) fn check_matrix(
    arg: &'static str,
    x: &Tensor,
    shape: &[usize],
    device: &Tensor,
) -> Result<()> {
    check_device(arg, x, device)?;
    check_shape(arg, x, shape)?;
    check_float(arg, x)
}

/// Checks in one host read that `mask` holds only 0 and 1 and that every `checked` tensor is
/// finite where `keep` (the mask as 0/1 in their dtype) is 1; the first violation is the error.
pub(crate) fn check_values(
    mask: &Tensor,
    keep: &Tensor,
    checked: &[(&'static str, &Tensor)],
) -> Result<()> {
    let mut counts = vec![bad_mask_count(mask)?.to_dtype(keep.dtype())?];
    for (_, x) in checked {
        counts.push(unmasked_non_finite(x, keep)?);
    }
    let counts = Tensor::stack(&counts, 0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if counts[0] > 0.0 {
        return Err(mask_error(counts[0]));
    }
    for ((arg, _), &bad) in checked.iter().zip(&counts[1..]) {
        if bad > 0.0 {
            return Err(non_finite_error(arg, bad));
        }
    }
    Ok(())
}

/// `[B,T]` inputs checked and scrubbed by [`scrubbed_matrices`].
pub(crate) struct Scrubbed {
    /// The mask as 0/1 in the compute dtype.
    pub mask: Tensor,
    /// The inputs in the compute dtype, 0 at masked positions (what carried a gradient still
    /// does, through the unmasked positions only).
    pub values: Vec<Tensor>,
}

/// Float `[B,T]` inputs that share the first one's shape and device, and their mask: shapes,
/// devices and dtypes checked, then in one host read the mask's values and the inputs' finite
/// values at unmasked positions ([`check_values`]); returned in the compute dtype of the first
/// input with the masked positions zeroed, so that padding reaches no value and no gradient.
pub(crate) fn scrubbed_matrices(
    floats: &[(&'static str, &Tensor)],
    mask: &Tensor,
) -> Result<Scrubbed> {
    let (first_arg, first) = floats[0];
    check_value(first.rank() == 2, first_arg, "a [B,T] tensor", first.dims())?;
    for &(arg, x) in floats {
        check_matrix(arg, x, first.dims(), first)?;
    }
    check_device("mask", mask, first)?;
    check_shape("mask", mask, first.dims())?;
    let dtype = compute_dtype(first.dtype());
    let keep = mask.ne(0.0)?;
    let keep_f = keep.to_dtype(dtype)?;
    let converted = floats
        .iter()
        .map(|&(arg, x)| Ok((arg, x.to_dtype(dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    let checked: Vec<(&'static str, &Tensor)> = converted.iter().map(|(a, x)| (*a, x)).collect();
    check_values(mask, &keep_f, &checked)?;
    let zeros = keep_f.zeros_like()?;
    let values = converted
        .iter()
        .map(|(_, x)| Ok(keep.where_cond(x, &zeros)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Scrubbed {
        mask: keep_f,
        values,
    })
}

/// Runs `f` on `x`'s values as `T`: the CPU storage itself when it is contiguous and of dtype
/// `T`, else a converted copy (one host read).
pub(crate) fn with_host<T: WithDType, O>(
    x: &Tensor,
    f: impl FnOnce(&[T]) -> Result<O>,
) -> Result<O> {
    if x.device().is_cpu() && x.dtype() == T::DTYPE {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<T>()?[start..end]);
        }
    }
    let values = x
        .detach()
        .to_dtype(T::DTYPE)?
        .flatten_all()?
        .to_vec1::<T>()?;
    f(&values)
}

/// A mask element: unmasked when non-zero (the loss checks the values themselves).
pub(crate) trait MaskValue: WithDType + Copy + Sync + Send {
    /// Whether the position is unmasked.
    fn on(self) -> bool;
    /// Whether the value is 0 or 1 (what a mask may hold).
    fn binary(self) -> bool;
}

impl MaskValue for u8 {
    #[inline(always)]
    fn on(self) -> bool {
        self != 0
    }
    #[inline(always)]
    fn binary(self) -> bool {
        self <= 1
    }
}

impl MaskValue for f32 {
    #[inline(always)]
    fn on(self) -> bool {
        self != 0.0
    }
    #[inline(always)]
    fn binary(self) -> bool {
        (self == 0.0) | (self == 1.0)
    }
}

impl MaskValue for f64 {
    #[inline(always)]
    fn on(self) -> bool {
        self != 0.0
    }
    #[inline(always)]
    fn binary(self) -> bool {
        (self == 0.0) | (self == 1.0)
    }
}
