#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for the device check in scripts/gpu/run.sh: the fedpool-client
# binary built with --features cuda (gzip), MiniLM converted to f16 (the device tool carries at most
# 64 MiB; the loader converts back to f32), config + tokenizer, and VADER.
# Usage: scripts/gpu/prepare.sh PATH/TO/fedpool-client   (built with `cargo build --release -p
#        fedpool-client --features cuda`; DESIGN.md "GPU builds" says how to get a toolkit here)
# Then carry `.gpu` and run `STEPS=800 bash .gpu/run.sh`.
set -euo pipefail
bin=${1:?usage: prepare.sh PATH/TO/fedpool-client}
assets=${FEDPOOL_ASSETS:-assets}
rm -rf .gpu && mkdir -p .gpu/assets/minilm
python3 scripts/gpu/to_f16.py "$assets/minilm/model.safetensors" .gpu/assets/minilm/model.safetensors
cp "$assets"/minilm/{config.json,tokenizer.json} .gpu/assets/minilm/
tar czf .gpu/vader.tgz -C "$assets" vader
cp "$bin" .gpu/fedpool-client && strip .gpu/fedpool-client && gzip -9 .gpu/fedpool-client
cp scripts/gpu/run.sh .gpu/run.sh
du -sh .gpu
