//! Peak memory of the hidden-states → lm_head → log-probs → SAPO path: allocates the inputs
//! (`[N,H]` hidden states, `[V,H]` weight), then (unless `none`) runs the loss forward and
//! backward to `hidden` and `weight` once with the chosen path: `fused` (the whole objective in
//! one pass, `PolicyLoss::forward_from_hidden`), `two-pass` (the fused linear log-probs, then the
//! fused loss), `composed` (candle's matmul and composed ops). Measure with
//!
//! ```text
//! cargo build --release --example linear_logprobs_memory
//! /usr/bin/time -v target/release/examples/linear_logprobs_memory none 4096 256 32768
//! /usr/bin/time -v target/release/examples/linear_logprobs_memory fused 4096 256 32768
//! /usr/bin/time -v target/release/examples/linear_logprobs_memory two-pass 4096 256 32768
//! /usr/bin/time -v target/release/examples/linear_logprobs_memory composed 4096 256 32768
//! ```
//!
//! and subtract the `none` run's "Maximum resident set size" from the others: that is the extra
//! memory of the path (PyTorch's: `python3 ../shared/bench/torch_baseline.py --memory
//! linear_logprobs/torch/4096x256x32768`).

use candle_core::{DType, Device, Tensor, Var};
use sapo::{Backend, LmHead, PolicyInputs, Sapo};

fn main() -> sapo::error::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map_or("fused", String::as_str);
    let dim =
        |k: usize, default: usize| args.get(k).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (n, h, v) = (dim(2, 4096), dim(3, 256), dim(4, 32768));
    let dev = Device::Cpu;
    let hidden = Var::randn(0f32, 1.0, (n, h), &dev)?;
    let weight = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (v, h), &dev)? / (h as f64).sqrt())?)?;
    let targets = Tensor::from_vec(
        (0..n as u32).map(|i| i * 7919 % v as u32).collect(),
        n,
        &dev,
    )?;
    let old = Tensor::randn(-10f32, 1.0, (1, n), &dev)?;
    let adv = Tensor::randn(0f32, 1.0, 1, &dev)?;
    let mask = Tensor::ones((1, n), DType::U8, &dev)?;
    let mib = |elems: usize| (elems * 4) as f64 / (1 << 20) as f64;
    println!(
        "{n}x{h}x{v}: logits would be {:.1} MiB, weight {:.1} MiB, hidden {:.1} MiB",
        mib(n * v),
        mib(v * h),
        mib(n * h)
    );
    let backend = match path {
        "none" => return Ok(()),
        "composed" => Backend::Composed,
        _ => Backend::Auto,
    };
    let loss = Sapo::default().build()?.with_backend(backend);
    let out = if path == "fused" {
        let hidden_3d = hidden.as_tensor().reshape((1, n, h))?;
        let targets_2d = targets.reshape((1, n))?;
        let head = LmHead::new(&hidden_3d, weight.as_tensor(), &targets_2d);
        loss.forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask))?
    } else {
        let (log_probs, _) = sapo::linear_log_probs_and_entropy_with(
            hidden.as_tensor(),
            weight.as_tensor(),
            None,
            &targets,
            1.0,
            backend,
        )?;
        let log_probs = log_probs.unsqueeze(0)?;
        loss.forward(&PolicyInputs::new(&log_probs, &old, &adv, &mask))?
    };
    let grads = out.loss.backward()?;
    let norm = |t: &Var| -> sapo::error::Result<f32> {
        let g = grads.get(t.as_tensor()).expect("gradient");
        Ok(g.abs()?.sum_all()?.to_scalar::<f32>()?)
    };
    println!(
        "{path}: |∂hidden|₁ = {}, |∂W|₁ = {}",
        norm(&hidden)?,
        norm(&weight)?
    );
    Ok(())
}
