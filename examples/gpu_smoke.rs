//! One small case of each GPU kernel, forward and backward, on a CUDA device with
//! `Backend::Fused`, checked against the CPU kernels: what `scripts/gpu-check.sh` runs under
//! `compute-sanitizer` (memcheck, racecheck, initcheck, synccheck) on a GPU machine.
//!
//! ```bash
//! cargo run --release --features cuda --example gpu_smoke   # needs a GPU
//! ```
//!
//! Without the `cuda` feature or without a GPU it says so and exits with status 2.

use candle_core::{DType, Device, Tensor, Var};
use sapo::{Backend, Gspo, KlEstimator, KlPenalty, LmHead, PolicyInputs, Sapo};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Deterministic values in `[-scale, scale]`.
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            scale * ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// The largest absolute difference of two tensors (read to the host).
fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max))
}

/// Runs `case` on the GPU and the CPU and checks that they agree within `tol`.
fn agree(
    name: &str,
    tol: f32,
    case: impl Fn(&Device, Backend) -> Result<Vec<Tensor>>,
) -> Result<()> {
    let gpu = case(&Device::new_cuda(0)?, Backend::Fused)?;
    let cpu = case(&Device::Cpu, Backend::Auto)?;
    let worst = gpu
        .iter()
        .zip(&cpu)
        .map(|(g, c)| max_diff(g, c))
        .collect::<Result<Vec<f32>>>()?
        .into_iter()
        .fold(0.0, f32::max);
    println!("{name}: max |gpu - cpu| = {worst:.3e}");
    if worst.is_nan() || worst > tol {
        return Err(format!("{name}: the GPU and the CPU kernels differ by {worst}").into());
    }
    Ok(())
}

fn main() -> Result<()> {
    if let Err(e) = Device::new_cuda(0) {
        eprintln!("gpu_smoke: no CUDA device ({e}); build with --features cuda and run on a GPU");
        std::process::exit(2);
    }
    let (b, t, h, v) = (3, 37, 16, 300);

    // The policy loss: SAPO at the token level; GSPO at the sequence level with a KL penalty.
    agree("policy loss (SAPO, GSPO + k3)", 1e-4, |dev, backend| {
        let lp = Var::from_vec(values(b * t, 1, 2.0), (b, t), dev)?;
        let old = Tensor::from_vec(values(b * t, 2, 2.0), (b, t), dev)?;
        let reference = Tensor::from_vec(values(b * t, 3, 2.0), (b, t), dev)?;
        let adv = Tensor::from_vec(values(b, 4, 1.0), b, dev)?;
        let mask = Tensor::ones((b, t), DType::U8, dev)?;
        let mut out = vec![];
        let sapo = Sapo::default().build()?.with_backend(backend);
        let gspo = Gspo::default()
            .config()
            .with_kl(Some(KlPenalty::new(0.05, KlEstimator::K3)))
            .build()?
            .with_backend(backend);
        for (loss, with_ref) in [(sapo, false), (gspo, true)] {
            let mut inputs = PolicyInputs::new(&lp, &old, &adv, &mask);
            if with_ref {
                inputs = inputs.with_ref_log_probs(&reference);
            }
            let result = loss.forward(&inputs)?;
            result.metrics.check()?;
            let grads = result.loss.backward()?;
            out.push(result.loss.reshape(1)?);
            out.push(grads.get(lp.as_tensor()).ok_or("no gradient")?.clone());
        }
        Ok(out)
    })?;

    // Token log-probs and entropy from bf16 logits, forward and backward.
    agree("token log-probs (bf16)", 2e-2, |dev, backend| {
        let logits = Var::from_tensor(
            &Tensor::from_vec(values(b * t * v, 5, 4.0), (b, t, v), dev)?.to_dtype(DType::BF16)?,
        )?;
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7919) % v) as u32).collect();
        let targets = Tensor::from_vec(ids, (b, t), dev)?;
        let (lp, entropy) =
            sapo::token_log_probs_and_entropy_with(logits.as_tensor(), &targets, 0.9, backend)?;
        let grads = (lp.sum_all()? + entropy.sum_all()?)?.backward()?;
        let grad = grads.get(logits.as_tensor()).ok_or("no gradient")?.clone();
        Ok(vec![lp, entropy, grad])
    })?;

    // The fused lm_head path: log-probs from hidden states, then the loss straight from them.
    agree(
        "linear log-probs and forward_from_hidden",
        1e-3,
        |dev, backend| {
            let hidden = Var::from_vec(values(b * t * h, 6, 1.0), (b, t, h), dev)?;
            let weight = Var::from_vec(values(v * h, 7, 0.5), (v, h), dev)?;
            let ids: Vec<u32> = (0..b * t).map(|i| ((i * 31 + 3) % v) as u32).collect();
            let targets = Tensor::from_vec(ids, (b, t), dev)?;
            let (lp, entropy) = sapo::linear_log_probs_and_entropy_with(
                hidden.as_tensor(),
                weight.as_tensor(),
                None,
                &targets,
                1.0,
                backend,
            )?;
            let grads = (lp.sum_all()? + entropy.sum_all()?)?.backward()?;
            let mut out = vec![
                lp.clone(),
                entropy,
                grads.get(hidden.as_tensor()).ok_or("no gradient")?.clone(),
                grads.get(weight.as_tensor()).ok_or("no gradient")?.clone(),
            ];
            let old = (lp.detach() + Tensor::from_vec(values(b * t, 8, 0.2), (b, t), dev)?)?;
            let adv = Tensor::from_vec(values(b, 9, 1.0), b, dev)?;
            let mask = Tensor::ones((b, t), DType::U8, dev)?;
            let head = LmHead::new(hidden.as_tensor(), weight.as_tensor(), &targets);
            let result = Sapo::default()
                .build()?
                .with_backend(backend)
                .forward_from_hidden(&PolicyInputs::new(head, &old, &adv, &mask))?;
            result.metrics.check()?;
            let grads = result.loss.backward()?;
            out.push(result.loss.reshape(1)?);
            out.push(grads.get(weight.as_tensor()).ok_or("no gradient")?.clone());
            Ok(out)
        },
    )?;
    println!("gpu_smoke: every kernel agrees with the CPU");
    Ok(())
}
