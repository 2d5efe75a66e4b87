#!/usr/bin/env python3
"""PyTorch eager and Liger-Kernel on a CUDA device, the cases of `examples/gpu_bench.rs`.

- policy/<objective>/torch_eager/64x4096: SAPO, GSPO-token and GRPO over f32 log-probs, the
  formulas of ../shared/bench/torch_baseline.py;
- logits_grpo/{torch_eager,liger_triton}/4096x151936: bf16 logits [4, 1024, 151936] -> token
  log-probs -> TRL's GRPO loss (eps 0.2, no KL, seq-mean-token-mean), backward to the logits;
  Liger's `triton_grpo_loss` does it in one Triton kernel.

Prints one JSON object per line: {"id", "median_ms", "reps"} (CUDA events around each step).

    python3 scripts/gpu_bench.py            # on a machine with a GPU, torch and liger-kernel
"""
import json

import torch


def seq_mean_token_mean(l, mask):
    n = mask.sum(-1)
    per_seq = (l * mask).sum(-1) / n.clamp(min=1)
    keep = (n > 0).float()
    return (per_seq * keep).sum() / keep.sum().clamp(min=1)


def sapo(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05):
    r = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return seq_mean_token_mean(-torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * adv, mask)


def gspo(logp, old, adv, mask, lo=3e-4, hi=4e-4):
    n = mask.sum(-1).clamp(min=1)
    seq = ((logp - old) * mask).sum(-1) / n
    s = torch.exp(torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0))
    return seq_mean_token_mean(torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - lo, 1 + hi)), mask)


def grpo_dual(logp, old, adv, mask, lo=0.2, hi=0.2, c=3.0):
    r = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    l1 = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - lo, 1 + hi))
    l = torch.where(adv < 0, torch.minimum(-adv * c, l1), l1)
    return (l * mask).sum() / mask.sum()


def trl_grpo(logp, old, adv, mask, lo=0.2, hi=0.2):
    r = torch.exp(logp - old)
    return seq_mean_token_mean(torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - lo, 1 + hi)), mask)


def median_ms(step, warmup, reps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[reps // 2]


def report(case_id, median, reps):
    print(json.dumps({"id": case_id, "median_ms": round(median, 4), "reps": reps}), flush=True)


def policy(dev, b=64, t=4096):
    g = torch.Generator(device="cpu").manual_seed(0)
    old = torch.log(torch.rand(b, t, generator=g) * 0.96 + 0.02)
    lp = old + 0.05 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, 1, generator=g)
    lengths = 1 + (torch.rand(b, 1, generator=g) * t).long()
    mask = (torch.arange(t).unsqueeze(0) < lengths).float()
    old, lp, adv, mask = (x.to(dev) for x in (old, lp, adv, mask))
    for name, f in [("sapo", sapo), ("gspo", gspo), ("grpo", grpo_dual)]:
        def step():
            x = lp.detach().requires_grad_(True)
            f(x, old, adv, mask).backward()
        report(f"policy/{name}/torch_eager/{b}x{t}", median_ms(step, 5, 50), 50)


def logits_grpo(dev, b=4, l=1024, v=151936):
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (2.0 * torch.randn(b, l + 1, v, generator=g, device=dev)).to(torch.bfloat16)
    ids = torch.randint(0, v, (b, l), generator=g, device=dev)
    with torch.no_grad():
        lp0 = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = lp0 + 0.05 * torch.randn(b, l, generator=g, device=dev)
    adv = torch.randn(b, generator=g, device=dev)
    mask = torch.ones(b, l, device=dev)

    def eager():
        x = logits.detach().requires_grad_(True)
        lp = torch.log_softmax(x[:, :-1].float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        trl_grpo(lp, old, adv.unsqueeze(-1), mask).backward()
    report(f"logits_grpo/torch_eager/{b * l}x{v}", median_ms(eager, 2, 10), 10)

    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        print(json.dumps({"id": f"logits_grpo/liger_triton/{b * l}x{v}", "error": str(e)}), flush=True)
        return
    mask_i = torch.ones(b, l, device=dev, dtype=torch.int32)

    def liger():
        x = logits.detach().requires_grad_(True)
        out = triton_grpo_loss(x, old, None, ids, adv, mask_i, temperature=1.0, beta=0.0,
                               eps_low=0.2, eps_high=0.2, inplace=False)
        loss = out[0] if isinstance(out, tuple) else out
        if loss.dim() > 0:  # a per-token loss: TRL's seq-mean-token-mean
            loss = seq_mean_token_mean(loss, mask)
        loss.backward()
    report(f"logits_grpo/liger_triton/{b * l}x{v}", median_ms(liger, 2, 10), 10)


def main():
    dev = torch.device("cuda")
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}), flush=True)
    policy(dev)
    logits_grpo(dev)


if __name__ == "__main__":
    main()
