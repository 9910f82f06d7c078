#!/usr/bin/env bash
# The simulator study of the README: FedAvg-SSF, FedIns SSF pool and FedAvg-LoRA r=8 on VADER
# (8 clients x 2 domains), the same rounds for each, compared on one set of axes, and the
# centralised reference of each adapter (trained on the union of the clients' data).
# Writes docs/study/: comparison.md, the plots, one folder per arm, centralised-*/centralised.json.
# ~45 min on 2 CPU cores. Knobs: BIN, OUT, ARMS (names of docs/study/*.toml), CENTRALISED=0 to skip.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/fedpool-sim}
OUT=${OUT:-docs/study}
ARMS=${ARMS:-"fedavg-ssf fedins-ssf-pool fedavg-lora-r8"}
if [ ! -x "$BIN" ]; then
  cargo build --release -p fedpool-sim
fi
configs=()
for arm in $ARMS; do configs+=("docs/study/$arm.toml"); done
"$BIN" run --compare "${configs[@]}" --out "$OUT"
if [ "${CENTRALISED:-1}" != 0 ]; then
  for arm in $ARMS; do
    "$BIN" centralised --config "docs/study/$arm.toml" --out "$OUT/centralised-$arm"
  done
fi
