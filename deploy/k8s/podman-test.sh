#!/usr/bin/env bash
# scripts/deploy-test.sh k8s-podman: deploy/k8s/fedpool-sim.yaml's pods emulated with podman, for
# want of a cluster. The manifest is read (PyYAML), not copied: the coordinator Job's and the
# Indexed Job's args and env, their Secret `items:` (the flat keys of the README's `kubectl create
# secret` mapped into clients/), the ConfigMap's experiment, the pods' user (65532), fsGroup,
# defaultMode 0440, read-only root filesystem and /tmp emptyDir. The Service becomes the podman
# network's DNS name of the coordinator's container (fedpool-sim-coordinator); $(WORKER_INDEX)
# is expanded per worker as Kubernetes expands it from the job-completion-index annotation; the
# assets volume is the host's assets folder, read-only. What this does not test: the Kubernetes
# API, the scheduler, Jobs' restarts, the PVCs, UDP through a real CNI, GPUs.
# Needs the images of deploy/containers/podman-test.sh (localhost/fedpool-sim built from
# sim.Containerfile; rebuilt here from the host's target/release/fedpool-sim through the same
# cargo shim when the image lacks `worker`). ROUNDS (2) overrides the experiment's rounds;
# MANIFEST (deploy/k8s/fedpool-sim.yaml) another manifest of the same shape.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
WORK=${K8S_TEST_DIR:-/var/tmp/fedpool-k8s-test}
PODMAN_WORK=${PODMAN_TEST_DIR:-/var/tmp/fedpool-podman-test}
IMAGE=localhost/fedpool-sim:latest
NET=fedpool-k8s
ROUNDS=${ROUNDS:-2}
MANIFEST=${MANIFEST:-deploy/k8s/fedpool-sim.yaml}
ASSETS=${FEDPOOL_ASSETS:-$ROOT/assets}
T0=$(date +%s)
log() { echo "k8s-podman [$(( $(date +%s) - T0 )) s]: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ -f "$PODMAN_WORK/containers.conf" ] || die "run scripts/deploy-test.sh containers first (base images, containers.conf)"
export CONTAINERS_CONF=$PODMAN_WORK/containers.conf
if ! podman run --rm "$IMAGE" worker --help >/dev/null 2>&1; then
  log "rebuilding $IMAGE from sim.Containerfile with the host's fedpool-sim (cargo shim)"
  "$ROOT/target/release/fedpool-sim" worker --help >/dev/null || die "the host's fedpool-sim has no worker command"
  podman build -f deploy/containers/sim.Containerfile --ignorefile deploy/containers/.containerignore \
    --build-arg CUDA=0 --build-arg RUST_IMAGE=localhost/fedpool-base/rust-prebuilt:bookworm \
    --build-arg RUNTIME_IMAGE=localhost/fedpool-base/debian:bookworm -v "$ROOT/target/release:/prebuilt:ro" \
    -t "$IMAGE" . > "$WORK.build.log" 2>&1 || die "podman build: $(tail -n 3 "$WORK.build.log")"
fi

# The manifest's pods as JSON lines: name, args, env, secret items.
rm -rf "$WORK"; mkdir -p "$WORK"
python3 - "$MANIFEST" "$WORK" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = sys.argv[2]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
import os
os.makedirs(f"{out}/experiment", exist_ok=True)
open(f"{out}/experiment/experiment.toml", "w").write(by[("ConfigMap", "fedpool-sim-experiment")]["data"]["experiment.toml"])
svc = by[("Service", "fedpool-sim-coordinator")]
pods = {}
for job in ("fedpool-sim-coordinator", "fedpool-sim-workers"):
    spec = by[("Job", job)]["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    vols = {v["name"]: v for v in pod["volumes"]}
    secret = next(v["secret"] for v in vols.values() if "secret" in v)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    pods[job] = {
        "args": c["args"], "env": env, "user": pod["securityContext"]["runAsUser"],
        "fsGroup": pod["securityContext"]["fsGroup"], "mode": secret.get("defaultMode", 0o644),
        "items": [(i["key"], i["path"]) for i in secret["items"]], "mounts": mounts,
        "readOnlyRoot": c["securityContext"].get("readOnlyRootFilesystem", False),
        "completions": spec.get("completions", 1), "indexed": spec.get("completionMode") == "Indexed",
    }
pods["service"] = {"name": svc["metadata"]["name"], "port": svc["spec"]["ports"][0]["port"],
                   "protocol": svc["spec"]["ports"][0]["protocol"]}
json.dump(pods, open(f"{out}/pods.json", "w"), indent=1)
PY
W=$(python3 -c "import json; print(json.load(open('$WORK/pods.json'))['fedpool-sim-workers']['completions'])")
SVC=$(python3 -c "import json; print(json.load(open('$WORK/pods.json'))['service']['name'])")
log "manifest: coordinator Job, Indexed Job of $W workers, Service $SVC"

# The Secret, as the manifest's header makes it: `fedpool-sim certs`, flat keys.
"$ROOT/target/release/fedpool-sim" certs --out "$WORK/certs" --workers "$W" --san "$SVC" >&2
secret_key_file() { # key -> the file `kubectl create secret --from-file=key=...` reads
  case "$1" in worker-*) echo "$WORK/certs/clients/$1" ;; *) echo "$WORK/certs/$1" ;; esac
}
# Each pod's secret volume: its items, mode defaultMode, group fsGroup (as the kubelet writes it).
project_secret() { # job dir
  mkdir -p "$2"
  python3 -c "import json; [print(k, p) for k, p in json.load(open('$WORK/pods.json'))['$1']['items']]" |
    while read -r key path; do
      mkdir -p "$(dirname "$2/$path")"
      cp "$(secret_key_file "$key")" "$2/$path"
    done
  local mode group
  mode=$(python3 -c "import json; print(oct(json.load(open('$WORK/pods.json'))['$1']['mode'])[2:])")
  group=$(python3 -c "import json; print(json.load(open('$WORK/pods.json'))['$1']['fsGroup'])")
  find "$2" -type f -exec chmod "$mode" {} + -exec chgrp "$group" {} +
}
project_secret fedpool-sim-coordinator "$WORK/secret-coordinator"
project_secret fedpool-sim-workers "$WORK/secret-workers"
mkdir -p "$WORK/out" && chown 65532:65532 "$WORK/out"
# The experiment's rounds, shortened for this machine's 2 cores (the rest as in the ConfigMap).
sed -i "s/^rounds = .*/rounds = $ROUNDS/" "$WORK/experiment/experiment.toml"

# podman run arguments for a pod of the manifest.
pod_args() { # job
  python3 - "$WORK/pods.json" "$1" "$WORK" "$ASSETS" <<'PY'
import json, sys
pods, job, work, assets = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
p = pods[job]
src = {"experiment": f"{work}/experiment", "certs": f"{work}/secret-{'coordinator' if 'coordinator' in job else 'workers'}",
       "assets": assets, "out": f"{work}/out"}
a = ["--user", f"{p['user']}:{p['user']}", "--group-add", str(p["fsGroup"])]
if p["readOnlyRoot"]:
    a.append("--read-only")
for name, path in p["mounts"].items():
    if name == "tmp":
        a += ["--tmpfs", path]
    else:
        a += ["-v", f"{src[name]}:{path}" + ("" if name == "out" else ":ro")]
for k, v in p["env"].items():
    if v is not None:
        a += ["-e", f"{k}={v}"]
print("\n".join(a))
PY
}
job_args() { # job index
  python3 -c "import json; [print(x.replace('\$(WORKER_INDEX)', '$2')) for x in json.load(open('$WORK/pods.json'))['$1']['args']]"
}

cleanup() {
  podman rm -f "$SVC" >/dev/null 2>&1 || true
  for k in $(seq 0 $((W - 1))); do podman rm -f "fedpool-sim-workers-$k" >/dev/null 2>&1 || true; done
  podman network rm -f "$NET" >/dev/null 2>&1 || true
}
cleanup
[ "${KEEP:-0}" = 1 ] || trap cleanup EXIT
podman network create "$NET" >/dev/null
mapfile -t CA < <(pod_args fedpool-sim-coordinator)
mapfile -t CR < <(job_args fedpool-sim-coordinator 0)
log "coordinator: fedpool-sim ${CR[*]}"
podman run -d --name "$SVC" --network "$NET" "${CA[@]}" "$IMAGE" "${CR[@]}" >/dev/null
mapfile -t WA < <(pod_args fedpool-sim-workers)
for k in $(seq 0 $((W - 1))); do
  mapfile -t WR < <(job_args fedpool-sim-workers "$k")
  [ "$k" = 0 ] && log "worker K: fedpool-sim ${WR[*]}"
  podman run -d --name "fedpool-sim-workers-$k" --network "$NET" "${WA[@]}" -e "JOB_COMPLETION_INDEX=$k" \
    -e RAYON_NUM_THREADS=1 "$IMAGE" "${WR[@]}" >/dev/null
done
rc=$(podman wait "$SVC")
podman logs "$SVC" > "$WORK/coordinator.log" 2>&1
log "the coordinator exited $rc; its last lines:"
tail -n 8 "$WORK/coordinator.log" >&2
for k in $(seq 0 $((W - 1))); do
  log "worker-$k: $(podman inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' "fedpool-sim-workers-$k"); $(podman logs --tail 1 "fedpool-sim-workers-$k" 2>&1)"
done
[ "$rc" = 0 ] || die "the coordinator exited $rc"
got=$(tail -n +2 "$WORK/out/rounds.csv" | cut -d, -f1 | tr '\n' ' ')
[ "$got" = "$(seq -s ' ' 1 "$ROUNDS") " ] || die "rounds.csv has rounds '$got'"
log "ok: $WORK/out/rounds.csv has rounds 1..$ROUNDS"
cat "$WORK/out/rounds.csv" >&2
