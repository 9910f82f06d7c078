#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for the device check in scripts/gpu/run.sh: fedpool-sim built with
# --features cuda (stripped, gzip), MiniLM converted to f16 (the device tool carries at most 64 MiB
# in all; the loader converts back to f32), config + tokenizer, VADER, and run.sh.
# Usage: scripts/gpu/prepare.sh [TOOLKIT_DIR]
#   Builds with the CUDA 13.0 toolchain that ../shared/cuda/toolkit.sh assembles in TOOLKIT_DIR
#   (default ~/.cache/fedpool-cuda; ~530 MB once), in target/cuda (a cold build took 22 min on the
#   2-core dev machine). With FEDPOOL_CLIENT_BIN
#   set to a cuda fedpool-client it packs that too (the adapter comparison of the README; the two
#   binaries and the model may exceed the 64 MiB cap: check the size printed at the end).
# Then, with a lent device: carry `.gpu` and run `bash .gpu/run.sh` (≤ 10 minutes; tables in $OUT).
set -euo pipefail
cd "$(dirname "$0")/../.."
assets=${FEDPOOL_ASSETS:-assets}
toolkit=${1:-$HOME/.cache/fedpool-cuda}
shared=${FEDPOOL_SHARED:-../shared}
cargo fetch >/dev/null
eval "$("$shared/cuda/toolkit.sh" "$toolkit")"
# Its own target folder: the CPU build in target/ stays as it is.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release -p fedpool-sim --features cuda
rm -rf .gpu && mkdir -p .gpu/assets/minilm
python3 scripts/gpu/to_f16.py "$assets/minilm/model.safetensors" .gpu/assets/minilm/model.safetensors
cp "$assets"/minilm/{config.json,tokenizer.json} .gpu/assets/minilm/
tar czf .gpu/vader.tgz -C "$assets" vader
for bin in "$CARGO_TARGET_DIR/release/fedpool-sim" ${FEDPOOL_CLIENT_BIN:-}; do
  name=$(basename "$bin")
  cp "$bin" ".gpu/$name" && strip ".gpu/$name" && gzip -9 ".gpu/$name"
done
cp scripts/gpu/run.sh .gpu/run.sh
du -sh .gpu
