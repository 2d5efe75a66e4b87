//! What each mask inside the policy loss costs, as a ratio to the same call without it, measured
//! so that a machine whose speed drifts between benches (a shared VM) moves both sides alike: the
//! calls of `benches/policy_loss.rs`'s group `masks/` (SAPO, fused CPU path, forward + backward,
//! 64×4096 by default, the same inputs), run in alternation — the call without a mask and the
//! call with it, in a round, the order swapped every round — and the ratio taken per round.
//! Prints, per mask, the median of the per-round ratios with its quartiles, and the median times.
//!
//! ```text
//! cargo run --release --example masks_overhead -- --rounds 200            # every mask
//! cargo run --release --example masks_overhead -- --rounds 200 --only m2po # M2PO's two settings
//! ```
//!
//! The criterion benches (`cargo bench --bench policy_loss -- "^masks/"`) give each call's time;
//! this gives the ratio of #23's target (at most 1.15× the call without the mask).

use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use sapo::{PolicyLoss, PolicyMasks, Sapo};

#[path = "../benches/shared/policy_inputs.rs"]
mod policy_inputs;

use policy_inputs::{
    inputs, like_a_training_process, mask_inputs, mask_settings, masked_inputs, Inputs,
};

#[derive(Parser)]
#[command(about = "Each mask's cost as a ratio to the call without it, in alternation")]
struct Args {
    /// Measured rounds per mask (each round: one call without the mask, one with it).
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Unmeasured rounds first.
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    /// Rows.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Only the masks whose name contains this (`opsm`, `top_entropy`, `m2po`, `m2po_idle`).
    #[arg(long, default_value = "")]
    only: String,
}

/// One timed forward + backward of `loss` on the batch, with the extra inputs its masks read.
fn step(
    loss: &PolicyLoss,
    masks: &PolicyMasks,
    x: &Inputs,
    extra: &(candle_core::Tensor, candle_core::Tensor),
) -> Result<f64, sapo::Error> {
    let start = Instant::now();
    let out = loss.forward(&masked_inputs(x, masks, extra))?;
    out.loss.backward()?;
    Ok(start.elapsed().as_secs_f64())
}

/// The `q` quantile of `values` (sorted in place; nearest rank).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = (q * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (b, t) = (args.batch, args.tokens);
    like_a_training_process();
    let x = inputs(b, t, &Device::Cpu);
    let extra = mask_inputs(&x, b, t);
    let none = PolicyMasks::default();
    let plain = Sapo::default().config().with_masks(none).build()?;
    println!(
        "SAPO, fused CPU path, {b}x{t}, forward + backward; {} rounds per mask, order swapped every round",
        args.rounds
    );
    println!(
        "| mask | ratio to no mask, median | quartiles | no mask, median | with the mask, median |"
    );
    println!("|---|---|---|---|---|");
    let measured = mask_settings()
        .into_iter()
        .filter(|(name, _)| *name != "none" && name.contains(&args.only));
    for (name, masks) in measured {
        let masked = Sapo::default().config().with_masks(masks).build()?;
        let (mut ratios, mut without, mut with) = (vec![], vec![], vec![]);
        for round in 0..args.warmup + args.rounds {
            let (a, m) = if round % 2 == 0 {
                let a = step(&plain, &none, &x, &extra)?;
                (a, step(&masked, &masks, &x, &extra)?)
            } else {
                let m = step(&masked, &masks, &x, &extra)?;
                (step(&plain, &none, &x, &extra)?, m)
            };
            if round >= args.warmup {
                ratios.push(m / a);
                without.push(a);
                with.push(m);
            }
        }
        println!(
            "| {name} | {:.3}× | {:.3}–{:.3}× | {:.3} ms | {:.3} ms |",
            quantile(&mut ratios, 0.5),
            quantile(&mut ratios, 0.25),
            quantile(&mut ratios, 0.75),
            quantile(&mut without, 0.5) * 1e3,
            quantile(&mut with, 0.5) * 1e3,
        );
    }
    Ok(())
}
