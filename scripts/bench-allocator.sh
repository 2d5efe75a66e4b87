#!/usr/bin/env bash
# One sitting, two environments: the default one, and one where glibc keeps freed memory instead
# of handing it back to the kernel (GLIBC_TUNABLES, read at process start) and candle's CPU
# thread pool spins less before it parks (CANDLE_BARRIER_POOL_SPIN_LIMIT). PyTorch eager,
# torch.compile (../shared/bench/torch_baseline.py, 2 threads) and the crate's fused benches
# (SAPO, GSPO-token, GRPO at 64x4096, token log-probs at 1024x32768) under each; the README's
# "Where the time goes" table comes from this script's output.
#
#   scripts/bench-allocator.sh [OUT_DIR]      # default /tmp/sapo-allocator; about 5 minutes
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/sapo-allocator}
mkdir -p "$out"
tuned="GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824 CANDLE_BARRIER_POOL_SPIN_LIMIT=100"
cargo bench --bench policy_loss --bench logprobs --no-run >/dev/null 2>&1
for mode in default tuned; do
  if [ "$mode" = tuned ]; then vars=$tuned; else vars="SAPO_BENCH_ENV=default"; fi
  rm -f "$out/torch_$mode.jsonl" "$out/compile_$mode.jsonl" "$out/crate_$mode.txt"
  for only in sapo gspo grpo logprobs; do
    reps=60
    [ "$only" = logprobs ] && reps=10
    env $vars python3 ../shared/bench/torch_baseline.py --threads 2 --reps $reps --only $only \
      >>"$out/torch_$mode.jsonl" 2>&1
    env $vars python3 ../shared/bench/torch_baseline.py --threads 2 --reps $reps --compile \
      --only $only >>"$out/compile_$mode.jsonl" 2>&1
  done
  env $vars cargo bench --bench policy_loss -- "^(sapo|gspo|grpo)/fused/64x4096" \
    >"$out/crate_$mode.txt" 2>&1
  env $vars cargo bench --bench logprobs -- "^logprobs/fused/1024x32768" >>"$out/crate_$mode.txt" 2>&1
done
grep -h '"id"' "$out"/torch_*.jsonl "$out"/compile_*.jsonl
grep -H "time:" "$out"/crate_*.txt
