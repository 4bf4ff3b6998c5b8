#!/usr/bin/env bash
# The demo: synthetic lesions -> scan -> balance -> models table (later steps train, tune, serve).
#   bash cluster/demo.sh DIR          run it, outputs under DIR (default demo/)
#   bash cluster/demo.sh --stop DIR   stop anything it started
set -euo pipefail
cd "$(dirname "$0")/.."
STOP=0
if [ "${1:-}" = "--stop" ]; then STOP=1; shift; fi
DIR=${1:-demo}
PY=.venv/bin/python
SKIN=.venv/bin/skin
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

if [ "$STOP" = 1 ]; then
  echo "nothing running to stop"
  exit 0
fi

mkdir -p "$DIR"
step() { printf '\n== %s\n' "$*"; }
step "1/4 synthetic lesions (600 images, 6 classes, with masks) -> $DIR/synth"
[ -f "$DIR/synth/manifest.csv" ] || $SKIN data synth --out "$DIR/synth" --per-class 200 --size 160 --workers 2
step "2/4 scan: validate, split, leakage check -> $DIR/data"
$SKIN data scan "$DIR/synth" --out "$DIR/data" --quiet
step "3/4 balanced training manifest"
$SKIN data balance "$DIR/data" --per-class 150 --seed 0
step "4/4 the three members"
$SKIN models
