#!/usr/bin/env bash
# Start a Docker engine for cellforge's Docker backend, if none answers yet (idempotent).
#
# What it changes on the machine (see docker/README.md, "The engine"): it starts dockerd (which
# starts its own containerd) in the background with
#   --iptables=false --ip-masq=false --ip-forward=false  (no firewall rule, no sysctl change)
#   --exec-opt native.cgroupdriver=cgroupfs --storage-driver overlay2 (vfs where overlay2 fails)
# It creates the bridge docker0 (172.17.0.1/16), /var/run/docker.sock, the runtime folders
# /run/docker (with an nsfs mount of the default network namespace) and /run/containerd, the data
# root /var/lib/docker (images; kept) and the log file below. docker/stop-engine.sh stops what this
# script started and removes docker0, the mount and the runtime folders if they were not there before.
#
# Environment: CELLFORGE_DOCKERD_LOG (default /var/log/cellforge-dockerd.log),
# CELLFORGE_DOCKERD_TIMEOUT (seconds to wait, default 60), CELLFORGE_DOCKER_STORAGE (force a driver).
set -euo pipefail

STATE_DIR=/run/cellforge-engine
LOG=${CELLFORGE_DOCKERD_LOG:-/var/log/cellforge-dockerd.log}
TIMEOUT=${CELLFORGE_DOCKERD_TIMEOUT:-60}

# Any client works: a newer one (v28 in /usr/local/bin here) negotiates the API version down to
# Debian's dockerd 20.10 (API 1.41) by itself. $DOCKER picks another.
docker_cli() { "${DOCKER:-docker}" "$@"; }

engine_answers() { docker_cli info >/dev/null 2>&1; }

if engine_answers; then
  echo "Docker engine already answers; nothing to start."
  exit 0
fi

if [ "$(id -u)" != "0" ]; then
  echo "No Docker engine answers and starting one needs root (run as root, or start dockerd yourself)." >&2
  exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "dockerd is not installed (Debian: apt-get install docker.io)." >&2
  exit 1
fi

mkdir -p "$STATE_DIR" "$(dirname "$LOG")"
# Remember what was there before, so stop-engine.sh undoes only what we made.
if ip link show docker0 >/dev/null 2>&1; then echo yes >"$STATE_DIR/docker0-existed"; else echo no >"$STATE_DIR/docker0-existed"; fi
for d in /run/docker /run/containerd; do
  if [ -e "$d" ]; then echo yes >"$STATE_DIR/$(basename "$d")-existed"; else echo no >"$STATE_DIR/$(basename "$d")-existed"; fi
done

start_dockerd() {  # $1 = storage driver
  echo "Starting dockerd (storage driver $1, log $LOG)"
  echo "==== $(date -Is) cellforge start-engine.sh: storage driver $1" >>"$LOG"
  # setsid: the daemon outlives this shell and is not killed with the caller's process group.
  setsid dockerd \
    --iptables=false --ip-masq=false --ip-forward=false \
    --exec-opt native.cgroupdriver=cgroupfs \
    --storage-driver "$1" \
    --pidfile /var/run/docker.pid \
    >>"$LOG" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/dockerd.pid"
}

wait_for_engine() {  # returns 0 once `docker info` answers, 1 if dockerd died or time ran out
  local pid deadline
  pid=$(cat "$STATE_DIR/dockerd.pid")
  deadline=$((SECONDS + TIMEOUT))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if engine_answers; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.5
  done
  return 1
}

stop_started() {
  local pid
  pid=$(cat "$STATE_DIR/dockerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$STATE_DIR/dockerd.pid"
}

t0=$SECONDS
drivers=${CELLFORGE_DOCKER_STORAGE:-overlay2 vfs}
for driver in $drivers; do
  start_dockerd "$driver"
  if wait_for_engine; then
    echo "$driver" >"$STATE_DIR/storage-driver"
    echo "Docker engine up after $((SECONDS - t0)) s (pid $(cat "$STATE_DIR/dockerd.pid"), storage $driver)."
    exit 0
  fi
  echo "dockerd with storage driver $driver did not answer within ${TIMEOUT} s or exited." >&2
  stop_started
done

echo "Could not start the Docker engine. Last lines of $LOG:" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
