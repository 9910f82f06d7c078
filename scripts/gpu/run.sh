#!/usr/bin/env bash
# The device check for fedpool-client on a lent GPU: the four-adapter VADER comparison of the
# README, with the cuda binary and f16 MiniLM that scripts/gpu/prepare.sh put in .gpu/.
set -u
cd "$(dirname "$0")"
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
gunzip -f fedpool-client.gz && chmod +x fedpool-client
NV=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0] if hasattr(nvidia,'__path__') else nvidia.__file__))" 2>/dev/null)
for d in /usr/local/cuda/lib64 $(ls -d $NV/nvidia/*/lib 2>/dev/null) $(python3 -c "import site;print(site.getsitepackages()[0])" 2>/dev/null)/nvidia/*/lib; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; done
export LD_LIBRARY_PATH FEDPOOL_ASSETS=$PWD/assets RUST_LOG=info
echo "missing libs:"; ldd ./fedpool-client | grep "not found"
run() { # name args...
  local name=$1; shift
  local t=$(date +%s)
  ./fedpool-client train --data vader --device cuda:0 --batch-size 32 --max-len 64 --test-fraction 0.2 --seed 0 \
    --head-lr 1e-2 --out "out/$name" "$@" > "out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t ))s"
  python3 -c "import json;m=json.load(open('out/$name/metrics.json'));print({k:m.get(k) for k in ['adapter','accuracy','macro_f1','examples','wall_seconds','samples_per_second','steps']})" 2>/dev/null || tail -5 "out/$name.log"
  cp "out/$name.log" "$OUT/$name.log" 2>/dev/null; cp "out/$name/metrics.json" "$OUT/$name.json" 2>/dev/null
}
mkdir -p out; tar xzf vader.tgz -C assets
S=${STEPS:-600}
run linear-probe --adapter linear-probe --lr 1e-2 --steps $S
run ssf --adapter ssf --lr 5e-3 --steps $S
run ssf-pool --adapter ssf-pool --lr 5e-3 --steps $S
run lora --adapter lora --rank 8 --lr 2e-3 --steps $S
echo "total $(( $(date +%s) - T0 ))s"
