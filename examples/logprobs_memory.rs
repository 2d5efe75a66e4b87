//! Peak memory of the token-log-probs path: allocates `[N, V]` logits, then (unless `none`) runs
//! `Σ w·log_prob` forward and backward once with the chosen path. Measure with
//!
//! ```text
//! cargo build --release --example logprobs_memory
//! /usr/bin/time -v target/release/examples/logprobs_memory none      # logits alone
//! /usr/bin/time -v target/release/examples/logprobs_memory fused
//! /usr/bin/time -v target/release/examples/logprobs_memory composed
//! ```
//!
//! and subtract the `none` run's "Maximum resident set size" from the others: that is the extra
//! memory of the path, to compare with the logits' own size (printed).

use candle_core::{Device, Tensor, Var};
use sapo::Backend;

fn main() -> sapo::error::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "fused".into());
    let (n, v) = (1024usize, 32768usize);
    let dev = Device::Cpu;
    let logits = Var::randn(0f32, 3.0, (n, v), &dev)?;
    let targets = Tensor::from_vec(
        (0..n as u32).map(|i| i * 7919 % v as u32).collect(),
        n,
        &dev,
    )?;
    let weights = Tensor::randn(0f32, 1.0, n, &dev)?;
    println!(
        "logits: {n}x{v} f32 = {:.1} MiB",
        (n * v * 4) as f64 / (1 << 20) as f64
    );
    let backend = match path.as_str() {
        "none" => return Ok(()),
        "composed" => Backend::Composed,
        _ => Backend::Auto,
    };
    let (log_probs, _) =
        sapo::token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, backend)?;
    let grads = log_probs.mul(&weights)?.sum_all()?.backward()?;
    let grad = grads.get(logits.as_tensor()).expect("gradient");
    println!(
        "{path}: |grad|₁ = {}",
        grad.abs()?.sum_all()?.to_scalar::<f32>()?
    );
    Ok(())
}
