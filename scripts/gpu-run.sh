#!/usr/bin/env bash
# The GPU half of scripts/gpu-check.sh, copied into gpu-run/ as run.sh: runs on a machine with an
# NVIDIA GPU from the repository root (`bash gpu-run/run.sh`), each step under its own time limit
# (together at most 10 min 45 s; on an H200 the whole took 64–79 s), and writes one report,
# $OUT/gpu-report.txt (or gpu-run/gpu-report.txt). A step that fails is reported and the next one runs; the exit status
# is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
here=gpu-run
report=${OUT:-$here}/gpu-report.txt
started=$(date +%s)
failed=0
summary=()

# cudarc opens the CUDA libraries (cuBLAS, cuRAND, NVRTC) at run time: the toolkit's and the
# Python wheels' folders.
libs=$(ls -d /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib 2>/dev/null \
  | tr '\n' ':')
py_libs=$(python3 -c 'import glob, site; print(":".join(sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib"))))' 2>/dev/null)
export LD_LIBRARY_PATH=${libs}${py_libs}:${LD_LIBRARY_PATH:-}
export SAPO_TEST_DEVICE=cuda

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit and records the outcome.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo
  echo "==== $name (limit ${limit}s) ===="
  timeout "$limit" "$@"
  local rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    summary+=("PASS  $name (${took}s)")
  else
    failed=$((failed + 1))
    summary+=("FAIL  $name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'), ${took}s)")
  fi
}

run_all() {
  echo "sapo GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  python3 -c "import tarfile; tarfile.open('$here/bin.tar.xz').extractall('$here')" \
    || { echo "cannot unpack $here/bin.tar.xz"; failed=1; return; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  golden_dirs=$here/golden
  for extra in ties objectives; do
    [ -d "$here/golden-$extra" ] && golden_dirs=$golden_dirs:$here/golden-$extra
  done
  step "golden cases on the CUDA device (fused kernels and composed ops)" 60 \
    env SAPO_GOLDEN_DIR="$golden_dirs" "$here/bin/golden"
  step "GPU kernels against the CPU kernels on the device (gpu_sim)" 100 \
    "$here/bin/gpu_sim" --test-threads=1
  step "property tests on the device (fused kernels and composed ops)" 80 \
    env PROPTEST_CASES=64 "$here/bin/properties" --test-threads=4
  step "one small case of each kernel (gpu_smoke)" 30 "$here/bin/gpu_smoke"
  for tool in memcheck racecheck initcheck synccheck; do
    step "compute-sanitizer --tool $tool gpu_smoke" 45 \
      compute-sanitizer --tool "$tool" --error-exitcode 1 "$here/bin/gpu_smoke"
  done
  step "benchmarks: sapo on the device (gpu_bench)" 60 "$here/bin/gpu_bench"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sapo-site \
    "$here"/wheels/*.whl && export PYTHONPATH=/tmp/sapo-site${PYTHONPATH:+:$PYTHONPATH}
  step "benchmarks: PyTorch eager and Liger-Kernel (gpu_bench.py)" 90 \
    env PYTHONUNBUFFERED=1 python3 "$here/gpu_bench.py"
  # Informational (never a failure: ncu cannot read the counters on every machine): the
  # speed of light of the log-probs kernels, forward and backward, inside gpu_bench.
  step "ncu: the log-probs kernels' speed of light (informational)" 45 bash -c \
    "ncu --clock-control none --kernel-name regex:sapo_log_probs --launch-skip 4 --launch-count 2 \
       --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
       $here/bin/gpu_bench | grep -v '^{' || echo 'ncu could not profile here'"
  echo
  echo "==== summary ($(($(date +%s) - started))s) ===="
  printf '%s\n' "${summary[@]}"
  echo "$failed failed"
}

mkdir -p "$(dirname "$report")"
run_all > >(tee "$report") 2>&1
wait
exit "$failed"
