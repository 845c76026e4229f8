#!/usr/bin/env bash
# Base images for the opt-in container test on a machine that cannot pull from a registry (this project's
# development machines): a Debian bookworm root file system with Python 3.11 and the CPU build of torch already
# in /opt/venv, and an image holding only uv. Run as root, with a Docker engine up, then:
#   JOB_TEST_DOCKER=1 BASE_IMAGE=local/job-base:bookworm UV_IMAGE=local/uv:0.9.5 \
#     .venv/bin/python -m pytest tests/test_container.py -k image
# TORCH_WHEEL: a local torch==2.13.0 CPU wheel (the registry's default torch is the multi-gigabyte CUDA build).
set -euo pipefail
TORCH_WHEEL=${TORCH_WHEEL:?set TORCH_WHEEL to a local torch 2.13.0 CPU wheel}
UV_VERSION=${UV_VERSION:-0.9.5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps "uv==${UV_VERSION}" -d "$work/wheel"
mkdir -p "$work/uv"
python3 -m zipfile -e "$work"/wheel/uv-*.whl "$work/unpacked"
install -m 0755 "$work"/unpacked/uv-*.data/scripts/uv "$work/uv/uv"
tar -C "$work/uv" -c . | docker import - "local/uv:${UV_VERSION}"

rootfs="$work/rootfs"
debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
# The host's certificate bundle and resolver: a build inside this sandbox reaches the package index as the host does.
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
cp "$work/uv/uv" "$rootfs/usr/local/bin/uv"
cp "$TORCH_WHEEL" "$rootfs/tmp/"
chroot "$rootfs" /usr/local/bin/uv venv --python /usr/bin/python3.11 /opt/venv
chroot "$rootfs" env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    /usr/local/bin/uv pip install --no-cache --python /opt/venv/bin/python "/tmp/$(basename "$TORCH_WHEEL")"
rm -f "$rootfs/tmp/$(basename "$TORCH_WHEEL")" "$rootfs/usr/local/bin/uv"
tar -C "$rootfs" -c . | docker import --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' - local/job-base:bookworm
docker images local/job-base:bookworm
