#!/usr/bin/env bash
# The MLflow tracking server of a cluster: on the head only, bound to 127.0.0.1 (never all interfaces); open it
# through an SSH tunnel (`ray dashboard -p 5000 --remote-port 5000 <cluster.yaml>`). Its backend store and artifact
# store are the run folders' own `<storage>/mlflow.db` and `<storage>/mlartifacts`, which the workloads (the driver
# on the head, Ray Train's rank 0 on any node) write directly on the shared storage: no tracking port is needed,
# the server only serves the UI and the REST API on the head.
#   cluster/mlflow.sh start STORAGE [PORT]     (STORAGE: an absolute path, the jobs' run.storage; PORT: 5000)
#   cluster/mlflow.sh stop [PORT]
set -euo pipefail
pidfile() { echo "/tmp/condensation-mlflow-$1.pid"; }
stop() {
  local f; f=$(pidfile "$1")
  if [ -s "$f" ]; then kill -- "-$(cat "$f")" 2>/dev/null || true; rm -f "$f"; fi  # its whole group: workers too
}
case "${1:-}" in
  start)
    storage=${2:?usage: $0 start STORAGE [PORT]}; port=${3:-5000}
    case "$storage" in /*) ;; *) echo "$0: STORAGE must be an absolute path, got $storage" >&2; exit 2 ;; esac
    stop "$port"
    mkdir -p "$storage/mlartifacts"
    # setsid: a process group of its own, so that stop ends the server's worker processes as well
    setsid nohup mlflow server --host 127.0.0.1 --port "$port" --workers 1 \
      --backend-store-uri "sqlite:///$storage/mlflow.db" --artifacts-destination "$storage/mlartifacts" \
      >"/tmp/condensation-mlflow-$port.log" 2>&1 </dev/null &
    echo $! >"$(pidfile "$port")"
    echo "MLflow on 127.0.0.1:$port (store: sqlite:///$storage/mlflow.db, log: /tmp/condensation-mlflow-$port.log)" ;;
  stop) stop "${2:-5000}" ;;
  *) echo "usage: $0 start STORAGE [PORT] | stop [PORT]" >&2; exit 2 ;;
esac
