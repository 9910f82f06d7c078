#!/usr/bin/env bash
# The device check for fedpool on a lent GPU, from the .gpu/ folder scripts/gpu/prepare.sh made:
# 1. `fedpool-sim device-check --device cuda:0`: every fused kernel run on the GPU against the CPU
#    (values and gradients), the training step of LoRA r=8 / SSF / SSF pool at batch 32 × 64, and
#    lockstep (passes of 256 rows) against one client at a time for 32 and 256 clients of MiniLM,
#    SSF pool and LoRA r=8 — tables in $OUT/device-check.md;
# 2. if a cuda fedpool-client was packed too: the README's four-adapter VADER comparison
#    (STEPS, default 600) — $OUT/<adapter>.json.
# Without a GPU it says what it skips; a CPU build packed the same way then runs the check on the
# CPU with 2 and 4 clients (the cuda build cannot start without the driver's libcuda.so.1).
set -u
cd "$(dirname "$0")"
T0=$(date +%s)
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT" out
for b in fedpool-sim fedpool-client; do [ -f "$b.gz" ] && gunzip -f "$b.gz" && chmod +x "$b"; done
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))" 2>/dev/null)
for d in /usr/local/cuda/lib64 $(ls -d "$NV"/nvidia/*/lib 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH FEDPOOL_ASSETS=$PWD/assets RUST_LOG=warn
[ -d assets/vader ] || tar xzf vader.tgz -C assets
if nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; then
  echo "missing libraries:"; ldd ./fedpool-sim | grep "not found"
  ./fedpool-sim device-check --device cuda:0 --out "$OUT/device-check.md"
  echo "device-check rc=$? $(( $(date +%s) - T0 ))s"
else
  echo "no GPU here: skipped the kernels on cuda:0, the GPU training step and the GPU lockstep"
  echo "(32 and 256 clients); running the same check on the CPU with 2 and 4 clients instead"
  if ldd ./fedpool-sim | grep -q "libcuda.so.1 => not found"; then
    echo "this fedpool-sim is the cuda build and needs the NVIDIA driver's libcuda.so.1: nothing runs here"
    exit 0
  fi
  ./fedpool-sim device-check --device cpu --clients 2 4 --steps 2 --out "$OUT/device-check-cpu.md"
  echo "device-check (cpu) rc=$? $(( $(date +%s) - T0 ))s"
  exit 0
fi
[ -x fedpool-client ] || exit 0
run() { # name args...
  local name=$1; shift
  local t=$(date +%s)
  ./fedpool-client train --data vader --device cuda:0 --batch-size 32 --max-len 64 --test-fraction 0.2 --seed 0 \
    --head-lr 1e-2 --out "out/$name" "$@" > "out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t ))s"
  cp "out/$name.log" "$OUT/$name.log" 2>/dev/null; cp "out/$name/metrics.json" "$OUT/$name.json" 2>/dev/null
}
S=${STEPS:-600}
run linear-probe --adapter linear-probe --lr 1e-2 --steps $S
run ssf --adapter ssf --lr 5e-3 --steps $S
run ssf-pool --adapter ssf-pool --lr 5e-3 --steps $S
run lora --adapter lora --rank 8 --lr 2e-3 --steps $S
echo "total $(( $(date +%s) - T0 ))s"
