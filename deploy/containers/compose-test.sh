#!/usr/bin/env bash
# Runs deploy/containers/compose.yaml's federation under podman and checks that the coordinator
# commits every round (called by podman-test.sh, after the images localhost/fedpool-server and
# localhost/fedpool-client exist). MODE: podman-compose (the compose file itself) or manual (the
# same services, volumes, network and fixed address by hand with `podman run`, in the compose
# file's order: for a podman-compose that cannot wait for one-shot services to complete).
# The assets volume is filled as in compose.yaml, by scripts/fetch-assets.sh from PyPI, in a local
# python image (FEDPOOL_ASSETS_IMAGE; python:3.12-slim cannot be pulled here).
set -euo pipefail
MODE=${1:-manual}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
BASE=localhost/fedpool-base/debian:bookworm
PY=localhost/fedpool-base/python:bookworm
ROUNDS=$(sed -n 's/^rounds = \([0-9]*\).*/\1/p' deploy/containers/compose/server.toml)
T0=$(date +%s)
log() { echo "compose-test [$(( $(date +%s) - T0 )) s]: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

if ! podman image exists "$PY"; then
  log "making $PY (python3-pip from Debian) for the assets service"
  ctx=$(mktemp -d)
  # The host's CA bundle again after apt (installing ca-certificates rebuilds it without this
  # sandbox's egress CA: pip then fails with CERTIFICATE_VERIFY_FAILED).
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
  printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\nENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt\n' "$BASE" > "$ctx/Containerfile"
  podman build -q -t "$PY" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
export FEDPOOL_ASSETS_IMAGE=$PY RUNTIME_IMAGE=$BASE

check_log() { # the coordinator's log
  local committed
  committed=$(grep -cE "round [0-9]+ committed" "$1" || true)
  log "the coordinator committed $committed of $ROUNDS rounds"
  [ "$committed" -ge "$ROUNDS" ] || { tail -n 30 "$1" >&2; die "not every round committed"; }
}

if [ "$MODE" = podman-compose ]; then
  C=(podman-compose -p fedpool -f deploy/containers/compose.yaml)
  log "$(podman-compose version 2>/dev/null | head -n 1)"
  compose_clean() {
    "${C[@]}" --profile tools down -v >/dev/null 2>&1 || true
    podman ps -a -q --filter label=io.podman.compose.project=fedpool | xargs -r podman rm -f >/dev/null 2>&1 || true
    podman volume ls -q --filter label=io.podman.compose.project=fedpool | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  }
  compose_clean; : > /tmp/compose-up.log
  # podman-compose gives each service `podman run --requires=<its depends_on>`, and podman then
  # starts the finished one-shots again with the service (certs init --force: a new CA under the
  # issued certificates) and refuses to start it ("container state improper"). So, as the README
  # says for podman: the one-shots in order with --no-deps, then the long-running services.
  for s in assets certs issue-client-0 issue-client-1 issue-client-2 spec; do
    "${C[@]}" run --rm --no-deps "$s" >> /tmp/compose-up.log 2>&1 || { tail -n 20 /tmp/compose-up.log >&2; die "podman-compose run $s"; }
    log "one-shot $s: done"
  done
  "${C[@]}" up -d --no-deps coordinator client-0 client-1 client-2 >> /tmp/compose-up.log 2>&1 \
    || { tail -n 20 /tmp/compose-up.log >&2; die "podman-compose up"; }
  log "podman-compose up -d --no-deps coordinator client-0 client-1 client-2: returned"
  st=missing
  for _ in $(seq 900); do
    st=$(podman inspect --format '{{.State.Status}}' fedpool_coordinator_1 2>/dev/null || echo missing)
    [ "$st" = exited ] && break
    # A one-shot that failed leaves the coordinator "created" for ever.
    if [ "$st" = created ] && podman ps -a --filter label=io.podman.compose.project=fedpool --format '{{.Names}} {{.Status}}' | grep -E 'Exited \([1-9]' >&2; then
      die "a one-shot service failed (above)"
    fi
    sleep 1
  done
  podman logs fedpool_coordinator_1 > /tmp/compose-coordinator.log 2>&1 || true
  log "coordinator: $st, exit $(podman inspect --format '{{.State.ExitCode}}' fedpool_coordinator_1 2>/dev/null)"
  check_log /tmp/compose-coordinator.log
  "${C[@]}" --profile tools run --rm report >&2
  [ "${KEEP:-0}" = 1 ] || compose_clean
  log "ok (podman-compose)"
  exit 0
fi

# manual: compose.yaml by hand.
P=fedpool-manual
cleanup() {
  podman rm -f $P-coordinator $P-client-0 $P-client-1 $P-client-2 >/dev/null 2>&1 || true
  podman volume rm -f $P-assets $P-certs $P-config $P-server-state $P-client-0-state $P-client-1-state $P-client-2-state >/dev/null 2>&1 || true
  podman network rm -f $P >/dev/null 2>&1 || true
}
cleanup
[ "${KEEP:-0}" = 1 ] || trap cleanup EXIT
podman network create --subnet 172.30.86.0/24 $P >/dev/null
for v in assets certs config server-state client-0-state client-1-state client-2-state; do podman volume create $P-$v >/dev/null; done
S=localhost/fedpool-server:latest
CL=localhost/fedpool-client:latest
log "assets: scripts/fetch-assets.sh into the assets volume (PyPI)"
podman run --rm --user 0:0 -v "$ROOT/scripts:/fedpool/scripts:ro" -v $P-assets:/opt/fedpool/assets "$PY" \
  bash /fedpool/scripts/fetch-assets.sh /opt/fedpool/assets >&2
log "certs: init, then issue client-0..2"
podman run --rm -v $P-certs:/var/lib/fedpool/certs $S certs init --force --dir /var/lib/fedpool/certs --san coordinator --san 172.30.86.10 >&2
for k in 0 1 2; do
  podman run --rm -v $P-certs:/var/lib/fedpool/certs $S certs issue --force --dir /var/lib/fedpool/certs --name client-$k >&2
done
log "spec"
podman run --rm -v $P-assets:/opt/fedpool/assets:ro -v $P-config:/var/lib/fedpool/config $CL \
  spec --model /opt/fedpool/assets/minilm --adapter ssf-pool --num-labels 2 --out /var/lib/fedpool/config/spec.json >&2
log "coordinator at 172.30.86.10, then 3 client daemons"
podman run -d --name $P-coordinator --network $P --ip 172.30.86.10 \
  -v "$ROOT/deploy/containers/compose/server.toml:/etc/fedpool/server.toml:ro" \
  -v $P-certs:/var/lib/fedpool/certs:ro -v $P-config:/var/lib/fedpool/config:ro \
  -v $P-assets:/opt/fedpool/assets:ro -v $P-server-state:/var/lib/fedpool/state \
  $S run --config /etc/fedpool/server.toml >/dev/null
for k in 0 1 2; do
  podman run -d --name $P-client-$k --network $P --restart on-failure -e RAYON_NUM_THREADS=1 \
    -v "$ROOT/deploy/containers/compose/client-$k.toml:/etc/fedpool/client.toml:ro" \
    -v $P-certs:/var/lib/fedpool/certs:ro -v $P-assets:/opt/fedpool/assets:ro \
    -v $P-client-$k-state:/var/lib/fedpool/state \
    $CL run --config /etc/fedpool/client.toml >/dev/null
done
rc=$(podman wait $P-coordinator)
podman logs $P-coordinator > /tmp/compose-coordinator.log 2>&1
log "the coordinator exited $rc"
for k in 0 1 2; do
  log "client-$k: $(podman inspect --format '{{.State.Status}} exit {{.State.ExitCode}}' $P-client-$k), last line: $(podman logs --tail 1 $P-client-$k 2>&1)"
done
check_log /tmp/compose-coordinator.log
podman run --rm -v $P-server-state:/var/lib/fedpool/state:ro $S report --state /var/lib/fedpool/state >&2
[ "$rc" = 0 ] || die "the coordinator exited $rc"
log "ok (manual)"
