#!/usr/bin/env bash
# One benchmark sitting (the README's torch.compile table): PyTorch eager and torch.compile
# (../shared/bench/torch_baseline.py; `pip install torch numpy`), PyTorch's matmul of the lm_head
# shapes, then the crate's criterion benches of the fused paths (with candle's zero fill and add
# alone, `candle_accumulation`) and of the masks (#23), then the
# per-token and log-probs benches against candle with the first-gradient patch
# (scripts/candle-first-gradient.sh, in its own target directory, $SAPO_FIRST_GRADIENT_TARGET,
# default target/first-gradient, so that the stock build is kept), one after the other on a quiet
# machine. Every bench binary is built first, before anything is timed.
# Usage: scripts/bench-sitting.sh [OUT_DIR] (default /tmp/sapo-sitting); each part's output is a
# file there.
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/sapo-sitting}
fixed_target=${SAPO_FIRST_GRADIENT_TARGET:-target/first-gradient}
fixed() { CARGO_TARGET_DIR=$fixed_target scripts/candle-first-gradient.sh "$@"; }
mkdir -p $out
cargo bench --no-run > $out/build.txt 2>&1
fixed bench --no-run --bench policy_loss --bench logprobs >> $out/build.txt 2>&1
date > $out/start
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --only sapo > $out/torch_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --only gspo >> $out/torch_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --only grpo >> $out/torch_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --compile --only sapo > $out/compile_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --compile --only gspo >> $out/compile_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 60 --compile --only grpo >> $out/compile_policy.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 10 --only logprobs > $out/torch_lp.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 10 --compile --only logprobs > $out/compile_lp.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 5 --only linear > $out/torch_linear.jsonl 2>&1
python3 ../shared/bench/torch_baseline.py --threads 2 --reps 5 --compile --only linear > $out/compile_linear.jsonl 2>&1
python3 - > $out/torch_matmul.txt 2>&1 <<'PY'
import time, statistics, torch
torch.set_num_threads(2)
for N, H, V in [(1024, 512, 32768), (4096, 256, 32768)]:
    a = torch.randn(N, H); w = torch.randn(V, H)
    for _ in range(3): a @ w.T
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); a @ w.T; ts.append(time.perf_counter() - t0)
    m = statistics.median(ts)
    print(f"torch matmul {N}x{H}x{V}: {m*1e3:.1f} ms, {2*N*H*V/m/1e9:.1f} GFLOP/s")
PY
date > $out/torch_done
cargo bench --bench policy_loss -- "(sapo|gspo|grpo)/fused" > $out/crate_policy.txt 2>&1
cargo bench --bench logprobs -- "fused|candle_accumulation" > $out/crate_lp.txt 2>&1
cargo bench --bench linear_logprobs -- fused > $out/crate_linear.txt 2>&1
cargo bench --bench policy_loss -- "^masks/" > $out/crate_masks.txt 2>&1
fixed bench --bench policy_loss -- "(sapo|gspo|grpo)/fused" > $out/fixed_policy.txt 2>&1
fixed bench --bench logprobs -- "logprobs/fused" > $out/fixed_lp.txt 2>&1
date > $out/done
