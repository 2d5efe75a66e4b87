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
//! memory of the path on a cold step.
//!
//! `--warm` measures as `python3 ../shared/bench/torch_baseline.py --memory
//! linear_logprobs/torch/4096x256x32768` does for PyTorch: two warm-up steps, then the peak
//! resident set is reset (`5` written to `/proc/self/clear_refs`) and the step runs a third time;
//! it prints `VmHWM − VmRSS` around that step, in MiB. Memory the allocator kept from the
//! warm-up steps is part of the base there, for both programs. `--warm=K` runs `K` warm-up steps
//! instead (glibc's heap settles after a few: compare the absolute `VmHWM` too).

use candle_core::{DType, Device, Tensor, Var};
use sapo::{Backend, LmHead, PolicyInputs, Sapo};

/// A field of `/proc/self/status` in MiB (`VmRSS:`, `VmHWM:`); `None` where there is no such file.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> sapo::error::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    // `--warm` (two warm-up steps, as PyTorch's measurement) or `--warm=K` (K of them).
    let mut warm = None;
    for arg in args.iter().filter_map(|a| a.strip_prefix("--warm")) {
        warm = Some(match arg {
            "" => 2,
            k => match k.strip_prefix('=').and_then(|k| k.parse::<usize>().ok()) {
                Some(k) => k,
                None => {
                    eprintln!("--warm{arg}: expected --warm or --warm=K with K a whole number");
                    std::process::exit(2);
                }
            },
        });
    }
    args.retain(|a| !a.starts_with("--warm"));
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
    // One forward and backward to `hidden` and `W`: the gradients, as PyTorch's step returns
    // them (their norms are taken after the measured step).
    let step = || -> sapo::error::Result<candle_core::backprop::GradStore> {
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
        Ok(out.loss.backward()?)
    };
    // The `L1` norms of `∂hidden` and `∂W`.
    let norms = |grads: &candle_core::backprop::GradStore| -> sapo::error::Result<(f32, f32)> {
        let norm = |t: &Var| -> sapo::error::Result<f32> {
            let g = grads.get(t.as_tensor()).expect("gradient");
            Ok(g.abs()?.sum_all()?.to_scalar::<f32>()?)
        };
        Ok((norm(&hidden)?, norm(&weight)?))
    };
    let Some(warm_up_steps) = warm else {
        let (d_hidden, d_weight) = norms(&step()?)?;
        println!("{path}: |∂hidden|₁ = {d_hidden}, |∂W|₁ = {d_weight}");
        return Ok(());
    };
    for _ in 0..warm_up_steps {
        step()?;
    }
    // Resets VmHWM to the current resident set (Linux).
    let reset = std::fs::write("/proc/self/clear_refs", "5");
    let (Ok(()), Some(base)) = (reset, status_mib("VmRSS:")) else {
        println!("--warm needs Linux's /proc/self/clear_refs and /proc/self/status: not measured");
        return Ok(());
    };
    let grads = step()?;
    let peak = status_mib("VmHWM:").unwrap_or(f64::NAN);
    let (d_hidden, d_weight) = norms(&grads)?;
    println!(
        "{path}: |∂hidden|₁ = {d_hidden}, |∂W|₁ = {d_weight}; step after {warm_up_steps} \
         warm-up steps: extra peak {:.1} MiB (VmHWM {peak:.1} − VmRSS {base:.1} before the step)",
        peak - base
    );
    Ok(())
}
