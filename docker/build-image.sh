#!/usr/bin/env bash
# Build the sandbox image (default cellforge-sandbox:latest) from docker/Dockerfile. `make docker-build`.
#
# The base image, in this order:
#   1. $CELLFORGE_DOCKER_BASE when set (cellforge-base:bookworm is made first if missing);
#   2. debian:bookworm-slim when it is already present locally;
#   3. cellforge-base:bookworm when it is already present locally (made earlier by build-base.sh);
#   4. debian:bookworm-slim pulled from the registry, when one answers (within 60 s);
#   5. otherwise cellforge-base:bookworm, made now from Debian packages (docker/build-base.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
IMAGE=${CELLFORGE_SANDBOX_IMAGE:-cellforge-sandbox:latest}
LOCAL_BASE=${CELLFORGE_BASE_IMAGE:-cellforge-base:bookworm}
HUB_BASE=debian:bookworm-slim
have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

base=${CELLFORGE_DOCKER_BASE:-}
if [ -n "$base" ]; then
  if [ "$base" = "$LOCAL_BASE" ]; then docker/build-base.sh; fi
  why="CELLFORGE_DOCKER_BASE"
elif have "$HUB_BASE"; then
  base=$HUB_BASE; why="present locally"
elif have "$LOCAL_BASE"; then
  base=$LOCAL_BASE; why="present locally (made from Debian packages)"
elif timeout 60 "$DOCKER" pull -q "$HUB_BASE" >/dev/null 2>&1; then
  base=$HUB_BASE; why="pulled from the registry"
else
  echo "No image registry answers: making $LOCAL_BASE from Debian packages (docker/build-base.sh)."
  docker/build-base.sh
  base=$LOCAL_BASE; why="made from Debian packages"
fi

echo "Building $IMAGE from $base ($why)."
t0=$SECONDS
# --network host: where the base lacks a runtime library, apt reaches the mirror even when the
# engine's bridge has no forwarding (start-engine.sh runs dockerd with --ip-forward=false).
set +e
"$DOCKER" build --network host --build-arg BASE="$base" -t "$IMAGE" -f docker/Dockerfile . 2>&1 \
  | grep -vE '^ ---> |^Removing intermediate container|^DEPRECATED: The legacy builder|Install the buildx component|https://docs.docker.com/go/buildx/|^ *$'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then echo "docker build failed (exit $rc)." >&2; exit "$rc"; fi
echo "Built $IMAGE in $((SECONDS - t0)) s."
