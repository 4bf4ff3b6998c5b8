#!/usr/bin/env bash
# A local Ray head for the demo and for trying jobs: token auth on, 127.0.0.1, job server on.
#   bash cluster/local.sh start [STATE_DIR]   starts it (PID in STATE_DIR/ray-head.pid)
#   bash cluster/local.sh stop  [STATE_DIR]   stops the head this script started (by its PID)
#   source <(bash cluster/local.sh env [STATE_DIR])   a shell that can talk to it (token, address)
# Ports: GCS $RAY_PORT (6390), dashboard + Jobs API $RAY_DASHBOARD_PORT (8265), Ray Client
# $RAY_CLIENT_PORT (10001), job agent $RAY_DASHBOARD_AGENT_PORT (52365): set all four to run a
# second head beside another Ray on the same machine.
# Token auth (Ray's default since 2.59) stays on: the token is generated once into
# STATE_DIR/ray_token (mode 600) and every client here passes it (RAY_AUTH_TOKEN_PATH); a client
# without it is refused. The head keeps all its state in its own temp dir (recorded in
# STATE_DIR/ray-temp-dir), so nothing names it in /tmp/ray after it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
CMD=${1:?usage: local.sh start|stop|env [STATE_DIR]}
STATE=${2:-demo/state}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
PIDFILE=$STATE/ray-head.pid
TOKEN=$STATE/ray_token
RAY_PORT=${RAY_PORT:-6390}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN RAY_USAGE_STATS_ENABLED=0
# Local means local: `ray start` turns --node-ip-address=127.0.0.1 into the machine's network address, and
# then GCS, raylet, workers, the Ray Client server and the metrics exporters listen on every interface.
# Ray's single-machine mode (its switch for Windows and macOS, where it is the default) keeps the node at
# 127.0.0.1, and every one of them then listens on loopback only (tests/test_reliability.py checks with ss).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export PATH="$PWD/.venv/bin:$PATH"   # jobs run `python` from the project's venv
# On SIGTERM Ray 2.60 drains the node for up to 30 s first (for a Kubernetes pod whose proxies still route to
# it); after a Train job the drain never finishes and `stop` waited all 30 s. Nothing routes to a local head
# from elsewhere, so it stops at once unless this is set.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
# the service's state (its answer records: skin.records) beside the head's, unless set
export SKINRAY_STATE_DIR=${SKINRAY_STATE_DIR:-$STATE}

make_token() {
  [ -s "$TOKEN" ] && return 0
  (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$TOKEN")
}

case "$CMD" in
env)
  make_token
  echo "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN RAY_ADDRESS=http://127.0.0.1:$DASH_PORT" ;;
start)
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "Ray head already running (pid $(cat "$PIDFILE"))"; exit 0
  fi
  make_token
  # AF_UNIX socket paths must stay under 108 bytes: a short folder in /tmp, named in the state dir.
  TEMP=$(mktemp -d /tmp/skinray-ray.XXXXXX)
  echo "$TEMP" >"$STATE/ray-temp-dir"
  # --block keeps the head's supervisor in the foreground of a background job, so `stop`
  # can end exactly what was started here by PID, never by process name.
  nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" --temp-dir="$TEMP" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
    --dashboard-agent-listen-port="${RAY_DASHBOARD_AGENT_PORT:-52365}" \
    --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" --disable-usage-stats >"$STATE/ray-head.log" 2>&1 &
  echo $! >"$PIDFILE"
  echo "http://127.0.0.1:$DASH_PORT" >"$STATE/ray-dashboard"
  for _ in $(seq 1 90); do
    # The dashboard answers before the job agent is ready: wait until the Jobs API lists jobs.
    if curl -fsS -H "Authorization: Bearer $(cat "$TOKEN")" "http://127.0.0.1:$DASH_PORT/api/version" >/dev/null 2>&1 &&
       ray job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1; then
      echo "Ray head up: jobs at http://127.0.0.1:$DASH_PORT (pid $(cat "$PIDFILE"); token auth on, token in $TOKEN)"
      exit 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -n 20 "$STATE/ray-head.log" >&2; rm -rf "$TEMP" "$PIDFILE"; exit 1; }
    sleep 1
  done
  echo "Ray head did not come up in 90 s; log: $STATE/ray-head.log (stop it with: bash cluster/local.sh stop $STATE)" >&2
  exit 1 ;;
stop)
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    # Serve's applications first (a head still running replicas takes 30 s or more to end on SIGTERM), unless
    # the dashboard says there are none: `serve shutdown` alone costs 5 s on 2 cores.
    if [ -f "$STATE/ray-dashboard" ] && command -v serve >/dev/null; then
      dash=$(cat "$STATE/ray-dashboard")
      if ! curl -fsS -m 10 -H "Authorization: Bearer $(cat "$TOKEN" 2>/dev/null)" "$dash/api/serve/applications/" 2>/dev/null |
           python3 -c 'import json, sys; sys.exit(1 if json.load(sys.stdin).get("applications") else 0)' 2>/dev/null; then
        timeout 60 serve shutdown -y -a "$dash" >/dev/null 2>&1 || true
      fi
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE" "$STATE/ray-dashboard"
    if [ -f "$STATE/ray-temp-dir" ]; then rm -rf "$(cat "$STATE/ray-temp-dir")"; rm -f "$STATE/ray-temp-dir"; fi
    echo "Ray head stopped"
  else
    echo "no Ray head started from $STATE"
  fi ;;
*) echo "usage: local.sh start|stop|env [STATE_DIR]" >&2; exit 2 ;;
esac
