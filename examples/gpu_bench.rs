//! Forward + backward timings of the CUDA kernels (`Backend::Fused`) and of the composed ops on a
//! CUDA device, for `scripts/gpu-check.sh`'s report beside PyTorch eager and Liger-Kernel's Triton
//! GRPO loss (`scripts/gpu_bench.py`, the same inputs and settings):
//!
//! - `policy/<objective>/<path>/64x4096`: the policy loss over f32 log-probs (SAPO τ 1.0/1.05
//!   seq-mean-token-mean, GSPO-token ε 3e-4/4e-4, GRPO ε 0.2 with dual clip 3 token-mean), the
//!   inputs of `../shared/bench/torch_baseline.py`;
//! - `logits_grpo/<path>/4096x151936`: bf16 logits `[4, 1024, 151936]` → token log-probs → TRL's
//!   GRPO loss (ε 0.2, no KL, seq-mean-token-mean), the work of Liger's `triton_grpo_loss`.
//!
//! Prints one JSON object per line: `{"id", "median_ms", "reps"}`; each timing ends with a device
//! synchronisation.
//!
//! ```bash
//! cargo run --release --features cuda --example gpu_bench   # needs a GPU
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use sapo::{Backend, Grpo, PolicyInputs};

#[path = "../benches/shared/policy_inputs.rs"]
mod policy_inputs;

use policy_inputs::{inputs, objectives};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The median wall time of `reps` runs of `step` (after `warmup` runs), each synchronised.
fn median_ms(
    dev: &Device,
    warmup: usize,
    reps: usize,
    mut step: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        step()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        step()?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

fn report(id: &str, median: f64, reps: usize) {
    println!("{{\"id\": \"{id}\", \"median_ms\": {median:.4}, \"reps\": {reps}}}");
}

/// The policy loss over `[b, t]` f32 log-probs.
fn policy(dev: &Device, (b, t): (usize, usize)) -> Result<()> {
    let x = inputs(b, t, dev);
    let (log_probs, old, adv, mask) = (&x.log_probs, &x.old, &x.advantages, &x.mask);
    // SAPO, GSPO-token and GRPO: the objectives PyTorch's script has.
    for (name, loss) in objectives().into_iter().take(3) {
        for (path, backend) in [("fused", Backend::Fused), ("composed", Backend::Composed)] {
            let loss = loss.with_backend(backend);
            let reps = 50;
            let median = median_ms(dev, 5, reps, || {
                let out = loss.forward(&PolicyInputs::new(log_probs, old, adv, mask))?;
                out.loss.backward()?;
                Ok(())
            })?;
            report(&format!("policy/{name}/{path}/{b}x{t}"), median, reps);
        }
    }
    Ok(())
}

/// bf16 logits `[b, l, v]` → token log-probs → TRL's GRPO loss, backward to the logits.
fn logits_grpo(dev: &Device, (b, l, v): (usize, usize, usize)) -> Result<()> {
    let logits =
        Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, l, v), dev)?.to_dtype(DType::BF16)?)?;
    let targets = Tensor::rand(0f32, v as f32, (b, l), dev)?
        .floor()?
        .to_dtype(DType::U32)?;
    let old = (sapo::token_log_probs(logits.as_tensor(), &targets, 1.0)?.detach()
        + Tensor::randn(0f32, 0.05, (b, l), dev)?)?;
    let adv = Tensor::randn(0f32, 1.0, b, dev)?;
    let mask = Tensor::ones((b, l), DType::U8, dev)?;
    let loss = Grpo::default()
        .config()
        .with_log_ratio_clamp(None)
        .build()?;
    for (path, backend) in [("fused", Backend::Fused), ("composed", Backend::Composed)] {
        let loss = loss.with_backend(backend);
        let reps = 10;
        let median = median_ms(dev, 2, reps, || {
            let (lp, _) =
                sapo::token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, backend)?;
            let out = loss.forward(&PolicyInputs::new(&lp, &old, &adv, &mask))?;
            out.loss.backward()?;
            Ok(())
        })?;
        report(&format!("logits_grpo/{path}/{}x{v}", b * l), median, reps);
    }
    // Where the fused step's time goes: the log-probs forward alone, with the loss, and candle's
    // own share of the backward (the gradient stored as zeros + the first gradient), beside a
    // plain copy of the logits (the memory traffic of one read and one write).
    let reps = 10;
    let id = |part: &str| format!("logits_grpo/fused/{part}/{}x{v}", b * l);
    let forward = || {
        sapo::token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 1.0, Backend::Fused)
    };
    let median = median_ms(dev, 2, reps, || {
        forward()?;
        Ok(())
    })?;
    report(&id("log_probs_forward"), median, reps);
    let fused = loss.with_backend(Backend::Fused);
    let median = median_ms(dev, 2, reps, || {
        let (lp, _) = forward()?;
        fused.forward(&PolicyInputs::new(&lp, &old, &adv, &mask))?;
        Ok(())
    })?;
    report(&id("forward_and_loss"), median, reps);
    let median = median_ms(dev, 2, reps, || {
        logits.as_tensor().zeros_like()?.add(logits.as_tensor())?;
        Ok(())
    })?;
    report(&id("candle_zeros_plus_gradient"), median, reps);
    let median = median_ms(dev, 2, reps, || {
        logits.as_tensor().copy()?;
        Ok(())
    })?;
    report(&id("copy_of_the_logits"), median, reps);
    Ok(())
}

fn main() -> Result<()> {
    let dev = match Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!(
                "gpu_bench: no CUDA device ({e}); build with --features cuda and run on a GPU"
            );
            std::process::exit(2);
        }
    };
    policy(&dev, (64, 4096))?;
    logits_grpo(&dev, (4, 1024, 151_936))?;
    Ok(())
}
