#!/usr/bin/env bash
# Make the local base image cellforge-base:bookworm without any image registry: a minimal Debian
# bookworm root made by debootstrap from the Debian mirror, imported with `docker import`.
# Skips when the image exists (CELLFORGE_REBUILD_BASE=1 forces a rebuild).
#
# Environment: CELLFORGE_BASE_IMAGE (default cellforge-base:bookworm), CELLFORGE_DEBIAN_MIRROR
# (default: the first deb.debian.org-style mirror in /etc/apt/sources.list(.d), else
# http://deb.debian.org/debian).
set -euo pipefail

IMAGE=${CELLFORGE_BASE_IMAGE:-cellforge-base:bookworm}
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)

docker_cli() { "${DOCKER:-docker}" "$@"; }

if [ "${CELLFORGE_REBUILD_BASE:-0}" != "1" ] && docker_cli image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "Base image $IMAGE exists; skipping."
  exit 0
fi
if [ "$(id -u)" != "0" ]; then echo "debootstrap needs root." >&2; exit 1; fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "debootstrap is not installed (Debian: apt-get install debootstrap)." >&2; exit 1
fi

# The Debian mirror this machine's apt uses (one-line or deb822 format), else the public one.
mirror=${CELLFORGE_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -Eo '(https?://[^ ]+/debian)/?( |$)' | grep -v -- '-security' | head -n 1 | tr -d ' ' || true)
  mirror=${mirror%/}
  mirror=${mirror:-http://deb.debian.org/debian}
fi

# Runtime libraries of a pyenv-built CPython 3.12 (ldd of its lib-dynload) and of the wheels in the
# project's venv (torch, numpy, scipy, h5py ...), plus the basic tools the sandbox uses.
# Keep in sync with RUNTIME_PACKAGES in docker/Dockerfile.
PACKAGES=$(tr '\n' ',' <"$HERE/runtime-packages.txt" | sed 's/,*$//; s/,,*/,/g')

work=$(mktemp -d /var/tmp/cellforge-base.XXXXXX)
cleanup() {
  # debootstrap may leave proc/sys mounted inside the root on failure.
  for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

t0=$SECONDS
echo "debootstrap --variant=minbase $SUITE from $mirror (packages: $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  echo "debootstrap failed; last lines of its log:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
  exit 1
}
# Slim the root: apt lists, caches, docs and man pages are not needed at run time.
chroot "$work/root" apt-get clean >/dev/null 2>&1 || true
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin \
       "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/locale/"*
# Point apt at the public mirror, so a Dockerfile on top can install more packages.
echo "deb http://deb.debian.org/debian $SUITE main" >"$work/root/etc/apt/sources.list"
if [ "$mirror" != "http://deb.debian.org/debian" ]; then
  echo "deb $mirror $SUITE main" >"$work/root/etc/apt/sources.list"
fi

tar --numeric-owner -C "$work/root" -c . | docker_cli import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --change 'LABEL org.opencontainers.image.title=cellforge-base org.opencontainers.image.description="Debian bookworm minbase made by cellforge docker/build-base.sh"' \
  - "$IMAGE" >/dev/null
echo "Built $IMAGE in $((SECONDS - t0)) s ($(docker_cli image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))."
