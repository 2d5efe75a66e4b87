#!/usr/bin/env bash
# The prepared GPU check, in two halves.
#
#   scripts/gpu-check.sh            here (no GPU needed): builds everything the GPU run needs into
#                                   gpu-run/ (git-ignored, at most 64 MiB: what a device run can
#                                   carry) and prints the one command to run there.
#   bash gpu-run/run.sh             there (an NVIDIA GPU, PyTorch and Triton installed): in
#                                   64-79 s on an H200 runs the golden cases, the GPU-vs-CPU kernel
#                                   tests and the property tests on the CUDA device,
#                                   compute-sanitizer (memcheck, racecheck, initcheck, synccheck) on
#                                   one small case of each kernel, the benchmarks against PyTorch
#                                   eager and Liger-Kernel's Triton GRPO loss and an ncu profile of
#                                   the log-probs kernels (informational); writes one report,
#                                   $OUT/gpu-report.txt (gpu-run/gpu-report.txt without $OUT).
#
# The build uses the CUDA 13.0 wheels (scripts/cuda-env.sh) and its own target directory
# ($CARGO_TARGET_DIR/gpu-check, default target/gpu-check): release test binaries with
# `--features cuda`, the gpu_smoke and gpu_bench examples, stripped.
set -euo pipefail
cd "$(dirname "$0")/.."
section() { printf '== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
out=gpu-run
limit_mb=64

source scripts/cuda-env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/gpu-check
rm -rf "$out"
mkdir -p "$out/bin" "$out/golden" "$out/wheels"

section "the library with --features cuda (candle's kernels through nvcc)"
cargo build --release --features cuda --lib

# candle 0.11 links the CUDA libraries (cudarc's `dynamic-linking`): the executables need them at
# link time by their plain names. The wheels ship them versioned (libcublas.so.13, ...), and the
# driver's libcuda.so.1 comes only with a GPU's driver: link against symlinks and a stub libcuda
# (every driver symbol cudarc references, SONAME libcuda.so.1), which the real driver replaces
# when the binaries run there.
section "link-time stand-ins for the CUDA libraries"
stubs=$CARGO_TARGET_DIR/link-stubs
rm -rf "$stubs"
mkdir -p "$stubs"
for lib in nvrtc cublas cublasLt cudart curand; do
  real=$(ls "$CUDA_HOME"/lib/lib$lib.so.* | grep -E "lib$lib\.so\.[0-9]+$" | head -1)
  ln -s "$real" "$stubs/lib$lib.so"
done
nm --undefined-only "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib 2>/dev/null \
  | awk '$1 == "U" && $2 ~ /^cu[A-Z]/ { print "void " $2 "(void) {}" }' | sort -u >"$stubs/cuda_stub.c"
echo "   $(wc -l <"$stubs/cuda_stub.c") driver symbols"
cc -shared -fPIC -o "$stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$stubs/cuda_stub.c"
export LIBRARY_PATH=$stubs:$LIBRARY_PATH

section "release test binaries with --features cuda (golden, gpu_sim, properties)"
tests_json=$(mktemp)
cargo test --release --features cuda --no-run --test golden --test gpu_sim --test properties \
  --message-format=json-render-diagnostics >"$tests_json"
python3 - "$tests_json" "$out/bin" <<'PY'
import json, shutil, sys
wanted = {"golden", "gpu_sim", "properties"}
for line in open(sys.argv[1]):
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["name"] in wanted and "test" in msg["target"]["kind"]:
        shutil.copy(msg["executable"], f"{sys.argv[2]}/{msg['target']['name']}")
        wanted.discard(msg["target"]["name"])
if wanted:
    sys.exit(f"test binaries not built: {sorted(wanted)}")
PY
rm -f "$tests_json"

section "release examples with --features cuda (gpu_smoke, gpu_bench)"
cargo build --release --features cuda --example gpu_smoke --example gpu_bench
cp "$CARGO_TARGET_DIR/release/examples/gpu_smoke" "$CARGO_TARGET_DIR/release/examples/gpu_bench" \
  "$out/bin/"
strip "$out"/bin/*

section "golden cases, the PyTorch/Liger benchmark script, the Liger-Kernel wheel"
cp tests/golden/*.json "$out/golden/"
for extra in ties objectives; do
  if [ -d "../shared/golden/$extra" ]; then
    mkdir -p "$out/golden-$extra"
    cp "../shared/golden/$extra"/*.json "$out/golden-$extra/"
  fi
done
# The binaries are 65 MiB each, mostly the same embedded PTX (candle's kernels): one xz stream
# with a dictionary larger than a binary stores it once (about 11 MiB for the five); run.sh
# unpacks it with Python's lzma.
section "packing the binaries (xz, one stream)"
tar -cf - -C "$out" bin | xz -T1 -6 --lzma2=dict=192MiB >"$out/bin.tar.xz"
rm -rf "$out/bin"
cp scripts/gpu_bench.py scripts/gpu-run.sh "$out/"
mv "$out/gpu-run.sh" "$out/run.sh"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$out/wheels" liger-kernel==0.8.5

size_mb=$(du -sm "$out" | cut -f1)
section "gpu-run/: ${size_mb} MiB (limit ${limit_mb} MiB)"
du -sh "$out"/* | sed 's/^/   /'
if [ "$size_mb" -gt "$limit_mb" ]; then
  echo "gpu-run/ is over the ${limit_mb} MiB a device run carries"
  exit 1
fi
cat <<EOF

The GPU half, with the device tool (64-79 s on an H200; the limit leaves time to rerun):
  run(command="bash gpu-run/run.sh", carry=["gpu-run"], timeout_s=300)
The report comes back as gpu-report.txt.
EOF
