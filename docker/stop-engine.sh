#!/usr/bin/env bash
# Stop the Docker engine that docker/start-engine.sh started (and only that one), then undo what it
# added: the docker0 bridge, the nsfs mount under /run/docker, /run/docker and /run/containerd (each
# only if it was not there before) and the state folder. Images stay in
# /var/lib/docker so the next start is quick; `rm -rf /var/lib/docker` removes them too.
# An engine that start-engine.sh did not start (a system service, a user's dockerd) is left alone.
set -euo pipefail

STATE_DIR=/run/cellforge-engine
PIDFILE=$STATE_DIR/dockerd.pid

if [ ! -f "$PIDFILE" ]; then
  echo "No Docker engine started by start-engine.sh; nothing to stop."
  exit 0
fi
pid=$(cat "$PIDFILE")
# Only stop the process if it is still the dockerd we started (pids can be reused).
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "dockerd" ]; then
  # Containers first, so none is left running under a stopped daemon.
  ids=$("${DOCKER:-docker}" ps -q 2>/dev/null || true)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    "${DOCKER:-docker}" kill $ids >/dev/null 2>&1 || true
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "dockerd (pid $pid) did not stop within 30 s; sending SIGKILL." >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  echo "Stopped dockerd (pid $pid)."
else
  echo "dockerd pid $pid from start-engine.sh is no longer running."
fi

if kill -0 "$pid" 2>/dev/null; then
  echo "dockerd (pid $pid) is still running; leaving its network and runtime folders." >&2
  exit 1
fi
if [ "$(cat "$STATE_DIR/docker0-existed" 2>/dev/null || echo yes)" = "no" ] && ip link show docker0 >/dev/null 2>&1; then
  ip link delete docker0 || echo "Could not delete the docker0 bridge." >&2
fi
if [ "$(cat "$STATE_DIR/docker-existed" 2>/dev/null || echo yes)" = "no" ] && [ -d /run/docker ]; then
  # dockerd leaves the default network namespace handle mounted.
  { grep -o ' /run/docker/[^ ]*' /proc/mounts || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  rm -rf --one-file-system /run/docker
fi
if [ "$(cat "$STATE_DIR/containerd-existed" 2>/dev/null || echo yes)" = "no" ] && [ -d /run/containerd ] \
   && ! pgrep -x containerd >/dev/null 2>&1; then
  rm -rf --one-file-system /run/containerd
fi
rm -rf "$STATE_DIR"
