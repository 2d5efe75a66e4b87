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
    /// Only the masks whose name contains this (`opsm`, `top_entropy`, `m2po`, `m2po_idle`,
    /// `m2po_taken_once`).
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
    let args = &Args::parse();
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
        alternate(
            args,
            name,
            || step(&plain, &none, &x, &extra),
            || step(&masked, &masks, &x, &extra),
        )?;
    }
    if "m2po_taken_once".contains(&args.only) {
        taken_once(args, &plain, &x, &extra)?;
    }
    Ok(())
}

/// `plain` and `masked` in alternation (the order swapped every round), then the row of `name`:
/// the median ratio of the rounds, its quartiles and the median times.
fn alternate(
    args: &Args,
    name: &str,
    mut plain: impl FnMut() -> Result<f64, sapo::Error>,
    mut masked: impl FnMut() -> Result<f64, sapo::Error>,
) -> Result<(), sapo::Error> {
    let (mut ratios, mut without, mut with) = (vec![], vec![], vec![]);
    for round in 0..args.warmup + args.rounds {
        let (a, m) = if round % 2 == 0 {
            let a = plain()?;
            (a, masked()?)
        } else {
            let m = masked()?;
            (plain()?, m)
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
    Ok(())
}

/// M2PO's reduced mask taken once per batch (`m2po_reduced_mask`, τ of `m2po`) and
/// passed as the mask with M2PO off, in alternation with the call without a mask; then what
/// taking the mask costs, per batch (median of `rounds` calls).
fn taken_once(
    args: &Args,
    plain: &PolicyLoss,
    x: &Inputs,
    extra: &(candle_core::Tensor, candle_core::Tensor),
) -> Result<(), Box<dyn std::error::Error>> {
    let tau = policy_inputs::M2PO_CUTTING;
    let none = PolicyMasks::default();
    let reduced = sapo::m2po_reduced_mask(&x.mask, &extra.0, &x.old, tau)?;
    let with_reduced = Inputs {
        log_probs: x.log_probs.clone(),
        old: x.old.clone(),
        advantages: x.advantages.clone(),
        mask: reduced,
    };
    alternate(
        args,
        "m2po_taken_once (each later call)",
        || step(plain, &none, x, extra),
        || step(plain, &none, &with_reduced, extra),
    )?;
    let mut taking = vec![];
    for round in 0..args.warmup + args.rounds {
        let start = Instant::now();
        std::hint::black_box(sapo::m2po_reduced_mask(&x.mask, &extra.0, &x.old, tau)?);
        if round >= args.warmup {
            taking.push(start.elapsed().as_secs_f64());
        }
    }
    println!(
        "m2po_reduced_mask, once per batch: {:.1} µs (median; quartiles {:.1}–{:.1} µs)",
        quantile(&mut taking, 0.5) * 1e6,
        quantile(&mut taking, 0.25) * 1e6,
        quantile(&mut taking, 0.75) * 1e6,
    );
    Ok(())
}
