#!/usr/bin/env bash
# A local one-machine Ray cluster for `ray job submit`, with token authentication on and every port on 127.0.0.1.
# The commands (README "Clusters" gives the same ones; tests/test_cluster.py checks that they agree):
#   $ cluster/local.sh start
#     makes the token at ~/.ray/auth_token if there is none, starts Ray and MLflow (http://127.0.0.1:5000)
#   $ RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python workloads/curriculum.py
#   $ ray get-auth-token
#     the token that the dashboard at http://127.0.0.1:8265 asks for
#   $ cluster/local.sh stop
# Jobs keep relative run.storage in ~/condensation-runs/runs, the store the MLflow server serves.
# `stop` runs `ray stop`, which ends every Ray of this user on the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-start}" in
  start)
    ray get-auth-token --generate >/dev/null
    RAY_AUTH_MODE=token ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --num-cpus "$(nproc)"
    bash "$here/mlflow.sh" start "$HOME/condensation-runs/runs" ;;
  stop)
    bash "$here/mlflow.sh" stop
    ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
