#!/usr/bin/env bash
# The simulator studies of the README, one per folder of experiment files:
#   scripts/study.sh study     FedAvg-SSF, FedIns SSF pool, FedAvg-LoRA r=8 on VADER (8 clients x 2
#                              domains), then each adapter's centralised reference (~45 min, 2 cores)
#   scripts/study.sh budgets   fixed max/min rank, HetLoRA, FlexLoRA and importance budgets over
#                              constrained uplinks with a fixed deadline (~40 min)
# Runs the arms with `fedpool-sim run --compare` into docs/NAME/ (comparison.md, plots, one folder
# per arm). Knobs: BIN, OUT, ARMS (names of docs/NAME/*.toml), CENTRALISED=0 to skip the references.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:-study}
case "$NAME" in
  study) DEFAULT_ARMS="fedavg-ssf fedins-ssf-pool fedavg-lora-r8"; CENTRALISED=${CENTRALISED:-1} ;;
  budgets) DEFAULT_ARMS="fixed-max fixed-min hetlora flexlora importance"; CENTRALISED=${CENTRALISED:-0} ;;
  *) echo "usage: scripts/study.sh study|budgets" >&2; exit 2 ;;
esac
BIN=${BIN:-target/release/fedpool-sim}
OUT=${OUT:-docs/$NAME}
ARMS=${ARMS:-$DEFAULT_ARMS}
if [ ! -x "$BIN" ]; then
  cargo build --release -p fedpool-sim
fi
configs=()
for arm in $ARMS; do configs+=("docs/$NAME/$arm.toml"); done
"$BIN" run --compare "${configs[@]}" --out "$OUT"
if [ "$CENTRALISED" != 0 ]; then
  for arm in $ARMS; do
    "$BIN" centralised --config "docs/$NAME/$arm.toml" --out "$OUT/centralised-$arm"
  done
fi
