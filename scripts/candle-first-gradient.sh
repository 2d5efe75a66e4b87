#!/usr/bin/env bash
# Runs a cargo command against a copy of candle-core 0.11.1 whose backward stores the first
# gradient of each node directly instead of adding it into a fresh tensor of zeros
# (scripts/candle-first-gradient.patch; candle pull requests #3578 and #3822 propose the same).
# The copy is selected through cargo's [patch] table for that one command (`--config`), never as
# sapo's dependency:
#
#   scripts/candle-first-gradient.sh bench --bench policy_loss     # cargo bench ... with the patch
#   scripts/candle-first-gradient.sh test --test golden            # the golden tests with it
#   scripts/candle-first-gradient.sh                               # only prepare the copy, print the flag
#
# The copy comes from cargo's registry (offline: any build of this crate has put candle-core there)
# into $SAPO_CANDLE_FIRST_GRADIENT (default ~/.cache/sapo/candle-core-0.11.1-first-gradient), so it
# is exactly the published 0.11.1 plus the patch; a copy already patched is kept. Cargo rewrites
# Cargo.lock for a patched source: the script puts the original back when the command ends.
#
# In your own workspace: copy the patched folder (or this script and the patch), then add
#   [patch.crates-io]
#   candle-core = { path = "/path/to/candle-core-0.11.1-first-gradient" }
# to its Cargo.toml or .cargo/config.toml; candle-nn, candle-transformers and sapo then all use it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.11.1
copy=${SAPO_CANDLE_FIRST_GRADIENT:-$HOME/.cache/sapo/candle-core-$version-first-gradient}
patch_file=$root/scripts/candle-first-gradient.patch
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
find_source() { ls -d "$registry"/*/candle-core-$version 2>/dev/null | head -n 1 || true; }
source=$(find_source)
if [ -z "$source" ]; then
  (cd "$root" && cargo fetch --quiet)
  source=$(find_source)
fi
if [ -f "$copy/.sapo-first-gradient" ] && cmp -s "$copy/.sapo-first-gradient" "$patch_file"; then
  echo "$copy: candle-core $version with the first-gradient patch (kept)" >&2
else
  rm -rf "$copy"
  mkdir -p "$(dirname "$copy")"
  cp -R "$source" "$copy"
  chmod -R u+w "$copy"
  (cd "$copy" && patch --quiet -p1 < "$patch_file")
  cp "$patch_file" "$copy/.sapo-first-gradient"
  echo "$copy: candle-core $version with the first-gradient patch" >&2
fi
flag="patch.crates-io.candle-core.path='$copy'"
if [ $# -eq 0 ]; then
  echo "--config \"$flag\""
  exit 0
fi
cd "$root"
lock=$(mktemp)
cp Cargo.lock "$lock"
trap 'cp "$lock" Cargo.lock; rm -f "$lock"' EXIT
cargo --config "$flag" "$@"
