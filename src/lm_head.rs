//! [`LmHead`]: the lm_head and the hidden states it is applied to, an input of the log-probs
//! from hidden states and of [`crate::PolicyLoss::forward_from_hidden`]. Its checks are in
//! [`crate::linear_logprobs`].
//!
//! Layer: objectives (an input, as `losses/inputs.rs`).

use candle_core::Tensor;

/// The lm_head and what it is applied to: the source of the log-probs for
/// [`crate::PolicyLoss::forward_from_hidden`] (`x = hidden·Wᵀ + b`, `ℓ = log softmax(x/τ)_y`).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let hidden = Tensor::zeros((2, 3, 8), DType::F32, &dev)?; // [B, T, H]
/// let weight = Tensor::zeros((50, 8), DType::F32, &dev)?; // [V, H]
/// let targets = Tensor::zeros((2, 3), DType::U32, &dev)?;
/// let head = sapo::LmHead::new(&hidden, &weight, &targets).with_temperature(0.7);
/// assert_eq!(head.temperature, 0.7);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LmHead<'a> {
    /// The last hidden states (after the final norm), `[B,T,H]`.
    pub hidden: &'a Tensor,
    /// The lm_head's weight, `[V,H]`.
    pub weight: &'a Tensor,
    /// The lm_head's bias, `[V]`, if it has one.
    pub bias: Option<&'a Tensor>,
    /// The sampled tokens, `[B,T]` (u8/u32/i64, ids in `[0, V)`; in
    /// [`crate::PolicyLoss::forward_from_hidden`] masked positions are padding and may hold any id,
    /// Hugging Face's −100 included).
    pub targets: &'a Tensor,
    /// The sampling temperature `τ` (1.0 by default).
    pub temperature: f64,
}

impl<'a> LmHead<'a> {
    /// A head without bias at temperature 1.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # let t = Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?;
    /// let head = sapo::LmHead::new(&t, &t, &t);
    /// assert!(head.bias.is_none() && head.temperature == 1.0);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(hidden: &'a Tensor, weight: &'a Tensor, targets: &'a Tensor) -> Self {
        Self {
            hidden,
            weight,
            bias: None,
            targets,
            temperature: 1.0,
        }
    }

    /// Sets the bias `b` in `hidden·Wᵀ + b`.
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # let t = Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?;
    /// assert!(sapo::LmHead::new(&t, &t, &t).with_bias(&t).bias.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_bias(mut self, bias: &'a Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Sets the sampling temperature `τ` (`z = x/τ`).
    ///
    /// ```
    /// # use candle_core::{DType, Device, Tensor};
    /// # let t = Tensor::zeros((1, 1), DType::F32, &Device::Cpu)?;
    /// assert_eq!(sapo::LmHead::new(&t, &t, &t).with_temperature(0.5).temperature, 0.5);
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }
}
