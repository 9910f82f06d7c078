#!/usr/bin/env bash
# scripts/deploy-test.sh containers: the Containerfiles and the compose federation under podman,
# on a machine that may reach package registries but no container registry (this project's dev
# machines). What it does, each step timed:
#  1. installs podman, runc, debootstrap from Debian where missing (podman-compose from PyPI);
#  2. tries a real pull (docker.io) and says whether it worked;
#  3. makes the base images locally: a Debian bookworm rootfs from debootstrap, `podman import`ed as
#     localhost/fedpool-base/debian:bookworm (it stands in for distroless/cc, which carries the
#     same glibc), and a builder on it with gcc and the host's Rust toolchain mounted (it stands in
#     for rust:1.89-bookworm: no toolchain can be downloaded here);
#  4. builds deploy/containers/{server,client,sim}.Containerfile as they are, with RUST_IMAGE and
#     RUNTIME_IMAGE pointed at those. BUILD (default "server") lists the images whose builder stage
#     really compiles (cargo build --release --locked in the container, crates from the host's
#     registry cache); the others get a builder whose `cargo` copies the host's target/release
#     binary, so their Containerfile's stages, ignore file and runtime stage are still the real ones;
#  5. runs `fedpool-server --help` (and the others') in its image;
#  6. runs compose.yaml with podman-compose (COMPOSE=podman-compose, the default), or the same
#     services by hand with podman run (COMPOSE=manual; none: skip), and checks that the
#     coordinator commits every round.
# Sandbox quirks handled here, not in the Containerfiles: crun cannot run in this machine's
# cgroup v1/v2 hybrid ("cgroups in hybrid mode not supported"), and podman lowers its own
# RLIMIT_NPROC hard limit to 32768, so the default ulimits fail ("setrlimit RLIMIT_NPROC:
# Operation not permitted"): a containers.conf selects runc and ulimits that fit. The egress proxy
# here re-signs TLS with its own CA, so the local base image trusts the host's CA bundle.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
WORK=${PODMAN_TEST_DIR:-/var/tmp/fedpool-podman-test}
BUILD=${BUILD:-server}
COMPOSE=${COMPOSE:-}
BASE=localhost/fedpool-base/debian:bookworm
BUILDER=localhost/fedpool-base/rust-host:bookworm
SHIM=localhost/fedpool-base/rust-prebuilt:bookworm
mkdir -p "$WORK"
T0=$(date +%s)
log() { echo "podman-test [$(( $(date +%s) - T0 )) s]: $*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# 1. Packages.
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null
fi
log "$(podman --version), $(runc --version | head -n 1)"

# The sandbox's runtime settings (see the header).
cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$WORK/containers.conf

# 2. A pull, to say whether registries are reachable.
if timeout 60 podman pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>"$WORK/pull.err"; then
  log "pull of docker.io/library/debian:bookworm-slim worked"
else
  log "pull of docker.io/library/debian:bookworm-slim failed: $(tail -n 1 "$WORK/pull.err")"
fi

# 3. Base images without a pull.
if ! podman image exists "$BASE"; then
  if [ ! -x "$WORK/rootfs/bin/sh" ]; then
    log "debootstrap --variant=minbase bookworm (Debian's mirror)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || die "debootstrap: $(tail -n 3 "$WORK/debootstrap.log")"
  fi
  # This sandbox's egress CA (harmless elsewhere: the host's own trust store).
  mkdir -p "$WORK/rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  log "podman import of the rootfs as $BASE"
  tar -C "$WORK/rootfs" -c . | podman import -q - "$BASE" >/dev/null
fi
TOOLCHAIN=$(rustc --print sysroot)
if ! podman image exists "$BUILDER"; then
  log "making $BUILDER (gcc from Debian; Rust mounted from $TOOLCHAIN at build time)"
  mkdir -p "$WORK/builder"
  cat > "$WORK/builder/Containerfile" <<EOF
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make pkg-config && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo PATH=/opt/host-rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
  podman build -q -t "$BUILDER" "$WORK/builder" >/dev/null
fi
if ! podman image exists "$SHIM"; then
  mkdir -p "$WORK/shim"
  # `cargo build --release --locked -p fedpool-X [...]` -> copy /prebuilt/fedpool-X to target/release.
  cat > "$WORK/shim/cargo" <<'EOF'
#!/bin/sh
pkg=""; while [ $# -gt 0 ]; do [ "$1" = -p ] && pkg=$2; shift; done
echo "cargo shim: $pkg from the host's target/release (no compile); build context $(du -sh . | cut -f1), target/ $([ -e target ] && echo SENT || echo absent), assets/ $([ -e assets ] && echo SENT || echo absent)" >&2
mkdir -p target/release && cp "/prebuilt/$pkg" "target/release/$pkg"
EOF
  printf 'FROM %s\nCOPY cargo /usr/local/bin/cargo\nRUN chmod +x /usr/local/bin/cargo\n' "$BASE" > "$WORK/shim/Containerfile"
  podman build -q -t "$SHIM" "$WORK/shim" >/dev/null
fi

# 4. The images, from the project's Containerfiles.
for pkg in server client sim; do
  t=$(date +%s)
  args=(-f "deploy/containers/$pkg.Containerfile" --ignorefile deploy/containers/.containerignore
        --build-arg "RUNTIME_IMAGE=$BASE" -t "localhost/fedpool-$pkg:latest")
  # buildah 1.28 (podman 4.3) ignores a global ARG's default when it picks the stages that
  # `FROM builder-${CUDA}` needs ("short-name \"runtime-0\" did not resolve"): pass it.
  [ "$pkg" = server ] || args+=(--build-arg CUDA=0)
  if [[ " $BUILD " == *" $pkg "* ]]; then
    log "building fedpool-$pkg: cargo build --release in the container (this is the long part)"
    mkdir -p "${CARGO_HOME:-$HOME/.cargo}/registry"
    nice -n 10 podman build "${args[@]}" --build-arg "RUST_IMAGE=$BUILDER" \
      -v "$TOOLCHAIN:/opt/host-rust:ro" -v "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry" \
      . >"$WORK/build-$pkg.log" 2>&1 || die "podman build of $pkg: $(tail -n 5 "$WORK/build-$pkg.log")"
    how="compiled in the container"
  else
    [ -x "target/release/fedpool-$pkg" ] || die "no target/release/fedpool-$pkg for the prebuilt image"
    podman build "${args[@]}" --build-arg "RUST_IMAGE=$SHIM" -v "$ROOT/target/release:/prebuilt:ro" \
      . >"$WORK/build-$pkg.log" 2>&1 || die "podman build of $pkg: $(tail -n 5 "$WORK/build-$pkg.log")"
    how="host binary through the cargo shim"
  fi
  size=$(podman image inspect --format '{{.Size}}' "localhost/fedpool-$pkg:latest")
  log "built localhost/fedpool-$pkg ($how) in $(( $(date +%s) - t )) s, $((size / 1000000)) MB $(grep -o 'build context.*' "$WORK/build-$pkg.log" || true)"
done

# 5. The binaries run in their images (as user 65532).
for pkg in server client sim; do
  out=$(podman run --rm "localhost/fedpool-$pkg:latest" --version 2>&1) || die "podman run fedpool-$pkg --version: $out"
  log "podman run fedpool-$pkg --version: $out (user $(podman image inspect --format '{{.Config.User}}' "localhost/fedpool-$pkg:latest"))"
done
podman run --rm localhost/fedpool-server:latest --help | head -n 3 >&2

# 6. The compose federation.
# podman-compose from PyPI (1.6.0): Debian's 1.0.3 fails on compose.yaml's fixed address
# (KeyError: "fedpool={'ipv4_address': '172.30.86.10'}" in assert_cnt_nets).
VENV=${FEDPOOL_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedpool-deploy-venv}
if [ -z "$COMPOSE" ]; then
  if [ -x "$VENV/bin/podman-compose" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q podman-compose==1.6.0; }; then
    COMPOSE=podman-compose
  else COMPOSE=manual; fi
fi
export PATH=$VENV/bin:$PATH
if [ "$COMPOSE" != none ]; then bash "$ROOT/deploy/containers/compose-test.sh" "$COMPOSE"; fi
podman image prune -f >/dev/null   # the builder stages' dangling images
log "done"
