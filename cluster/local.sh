#!/usr/bin/env bash
# A local one-machine "cluster" for trying `ray job submit` (Ray 2.60 needs token auth off for a plain submit):
#   cluster/local.sh start && ray job submit --working-dir . -- python workloads/curriculum.py && cluster/local.sh stop
set -euo pipefail
case "${1:-start}" in
  start) RAY_AUTH_MODE=disabled ray start --head --num-cpus "$(nproc)" --dashboard-host 127.0.0.1 ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
