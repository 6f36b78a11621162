#!/usr/bin/env bash
# Build Strata's images on this machine, with no Docker engine and no registry: a Debian base made by debootstrap
# (bookworm: Python 3.11), the repository's own Dockerfile built on it by buildah, the result in podman's store.
# Only the base differs from a registry build (--build-arg BASE_IMAGE); the Dockerfile is the same.
#
#   deploy/docker/build_local.sh            # the CPU image: localhost/strata:cpu
#   deploy/docker/build_local.sh gpu        # the GPU image (CUDA torch from PyPI, ~3 GB more): localhost/strata:gpu
#
# Needs root and Debian's debootstrap, buildah, podman and runc (installed here when missing). Caches:
#   ~/.cache/strata/images/debian-SUITE.tar   the debootstrap rootfs, made once per suite
#   buildah's layer cache and RUN cache mounts (pip's downloads), kept between builds; STRATA_NO_CACHE=1 builds
#   every layer anew (pip's downloads stay cached)
# STRATA_WHEELS (CPU image: default /opt/wheels when it exists): a folder of wheels pip may take during the
# build, e.g. the CPU torch wheel where download.pytorch.org is out of reach.
# Writes the image's size and build time to benchmarks/results/image-KIND.json.
set -euo pipefail

KIND=${1:-cpu}
case "$KIND" in cpu | gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SUITE=${STRATA_BASE_SUITE:-bookworm}
MIRROR=${STRATA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${STRATA_IMAGE_CACHE:-$HOME/.cache/strata/images}
BASE=localhost/debian:$SUITE
TAG=${STRATA_IMAGE_TAG:-localhost/strata:$KIND}
# The CPU build only: the GPU image's torch comes from PyPI, and a local CPU wheel of the same version would win.
WHEELS=${STRATA_WHEELS:-$([ "$KIND" = cpu ] && [ -d /opt/wheels ] && echo /opt/wheels || true)}
RESULTS=${STRATA_RESULTS:-$ROOT/benchmarks/results}

log() { echo "build_local: $*" >&2; }

if [ "$(id -u)" != 0 ]; then echo "build_local.sh: run as root (debootstrap, buildah, podman)" >&2; exit 1; fi
missing=()
for tool in debootstrap buildah podman runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The base: a minimal Debian rootfs, cached as a tarball keyed by the suite, imported once into podman's store.
mkdir -p "$CACHE"
base_start=$(date +%s)
if ! podman image exists "$BASE"; then
    tarball=$CACHE/debian-$SUITE.tar
    if [ ! -s "$tarball" ]; then
        log "debootstrap $SUITE (once; cached in $tarball)"
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX") && chmod 755 "$rootfs"  # becomes the image's /
        # debootstrap mounts /proc (and more) inside the rootfs: unmount before deleting, and never cross into them.
        unmount_rootfs() { findmnt -rn -o TARGET | { grep "^$rootfs/" || true; } | sort -r | xargs -r umount -l; }
        drop_rootfs() { unmount_rootfs; rm -rf --one-file-system "$rootfs"; }
        trap drop_rootfs EXIT
        debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        unmount_rootfs
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
        drop_rootfs
        trap - EXIT
    fi
    podman import --quiet "$tarball" "$BASE" >/dev/null
fi
base_seconds=$(($(date +%s) - base_start))

# Build-time only, nothing of it lands in the image: a pip config that lets pip take wheels from $WHEELS (the CPU
# torch wheel when download.pytorch.org is out of reach, torch's own dependencies then from PyPI), and trusts the
# CA bundle pip trusts here (a proxy's CA, if any).
CA_BUNDLE=${STRATA_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
pipconf=$CACHE/pip-build-$KIND.conf
{
    echo "[global]"
    echo "retries = 2"
    echo "cert = /build-ca.crt"
    [ -n "$WHEELS" ] && printf 'find-links = /build-wheels\nextra-index-url = https://pypi.org/simple\n'
} >"$pipconf"
volumes=(--volume "$pipconf:/etc/pip.conf:ro" --volume "$CA_BUNDLE:/build-ca.crt:ro")
[ -n "$WHEELS" ] && volumes+=(--volume "$WHEELS:/build-wheels:ro")

log "building $TAG from deploy/docker/Dockerfile.$KIND on $BASE"
start=$(date +%s%N)
# chroot isolation: no nested runtime needed; ulimits no higher than this machine allows.
buildah build --isolation chroot --layers ${STRATA_NO_CACHE:+--no-cache} \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    -f "$ROOT/deploy/docker/Dockerfile.$KIND" --ignorefile "$ROOT/deploy/docker/Dockerfile.$KIND.dockerignore" \
    --build-arg "BASE_IMAGE=$BASE" "${volumes[@]}" -t "$TAG" "$ROOT" 2>&1 | tee "$CACHE/build-$KIND.log"
millis=$((($(date +%s%N) - start) / 1000000))

# What can be checked without a GPU: the image imports Strata (and, in the GPU image, Triton).
imports="import engine, cluster.app, torch" report="'torch', torch.__version__, 'cuda', torch.version.cuda"
if [ "$KIND" = gpu ]; then imports="$imports, triton" report="$report, 'triton', triton.__version__"; fi
versions=$(podman --runtime runc --cgroup-manager=cgroupfs run --rm --network none \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "$TAG" python -c "$imports; print($report)")
log "$TAG imports Strata: $versions"

size=$(podman image inspect --format '{{.Size}}' "$TAG")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
mkdir -p "$RESULTS"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >"$RESULTS/image-$KIND.json" <<EOF
{
  "image": "$TAG",
  "dockerfile": "deploy/docker/Dockerfile.$KIND",
  "base_image": "$BASE (debootstrap --variant=minbase $SUITE)",
  "commit": "$commit",
  "device": "$(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), no GPU",
  "builder": "$(buildah --version | cut -d' ' -f1-3)",
  "size_bytes": $size,
  "size_mb": $((size / 1000000)),
  "base_size_mb": $((base_size / 1000000)),
  "imports": "$imports: $versions",
  "build_seconds": $((millis / 1000)).$((millis % 1000 / 100)),
  "base_seconds": $base_seconds,
  "steps": $(grep -c '^STEP' "$CACHE/build-$KIND.log" || true),
  "steps_from_layer_cache": $(grep -c '^--> Using cache' "$CACHE/build-$KIND.log" || true),
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
log "$TAG: $((size / 1000000)) MB, built in $((millis / 1000)) s"
echo "$TAG"
