#!/usr/bin/env bash
# A local Ray head for the demo and for trying jobs: 127.0.0.1 only, job server on.
#   bash cluster/local.sh start [STATE_DIR]   starts it (PID in STATE_DIR/ray-head.pid)
#   bash cluster/local.sh stop  [STATE_DIR]   stops the head this script started (by its PID)
# Ports: GCS $RAY_PORT (6390), dashboard + Jobs API $RAY_DASHBOARD_PORT (8265).
# Token auth: Ray 2.5x/2.6x enables it for local clusters; this local demo head runs with
# RAY_AUTH_MODE=disabled on 127.0.0.1 only. On a real cluster keep it on and give clients the
# token with RAY_AUTH_TOKEN (see README "Run on a cluster").
set -euo pipefail
cd "$(dirname "$0")/.."
CMD=${1:?usage: local.sh start|stop [STATE_DIR]}
STATE=${2:-demo/state}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
PIDFILE=$STATE/ray-head.pid
RAY_PORT=${RAY_PORT:-6390}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
export PATH="$PWD/.venv/bin:$PATH"   # jobs run `python` from the project's venv

case "$CMD" in
start)
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "Ray head already running (pid $(cat "$PIDFILE"))"; exit 0
  fi
  # --block keeps the head's supervisor in the foreground of a background job, so `stop`
  # can end exactly what was started here by PID, never by process name.
  nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --disable-usage-stats >"$STATE/ray-head.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 90); do
    # The dashboard answers before the job agent is ready: wait until the Jobs API lists jobs.
    if curl -fsS "http://127.0.0.1:$DASH_PORT/api/version" >/dev/null 2>&1 &&
       ray job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1; then
      echo "Ray head up: jobs at http://127.0.0.1:$DASH_PORT (pid $(cat "$PIDFILE"))"; exit 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { cat "$STATE/ray-head.log"; exit 1; }
    sleep 1
  done
  echo "Ray head did not come up in 90 s; log: $STATE/ray-head.log" >&2; exit 1 ;;
stop)
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
    echo "Ray head stopped"
  else
    echo "no Ray head started from $STATE"
  fi ;;
*) echo "usage: local.sh start|stop [STATE_DIR]" >&2; exit 2 ;;
esac
