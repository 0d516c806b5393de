#!/usr/bin/env bash
# Submit a Flower run, print its log, and exit with the run's outcome.
#
# `flwr run --stream` (flwr 1.42) exits 0 whenever the run was *started*, also when the ServerApp
# then fails ("Exit Code: 700" in the log). The outcome is the run's status on the SuperLink,
# which `flwr ls CONNECTION --run-id N --format json` reports: finished:completed,
# finished:failed or finished:stopped. This script asks for it once the log stream has ended
# (the SuperLink ends the stream only when the run has finished).
#
# Usage: deploy/run_checked.sh APP CONNECTION [flwr run options, e.g. --run-config "..."]
# Exit:  0 finished:completed · 1 finished:failed or finished:stopped · 2 not started
# Last line: "run <id>: <status>" plus Flower's status details when there are any.
set -euo pipefail
usage="usage: $0 APP CONNECTION [flwr run options...]"
app=${1:?$usage}
conn=${2:?$usage}
shift 2

json_get() {  # json_get EXPR: evaluate EXPR on the JSON document d read from stdin
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]) or "")' "$1"
}

started=$(flwr run "$app" "$conn" --format json "$@") || true
run_id=$(printf '%s' "$started" | json_get 'd.get("run-id")' 2>/dev/null) || run_id=""
if [ -z "$run_id" ]; then
    printf '%s\n' "$started" >&2
    echo "run not started" >&2
    exit 2
fi
echo "started run $run_id"
flwr log "$run_id" "$conn" --stream
info=$(flwr ls "$conn" --run-id "$run_id" --format json)
status=$(printf '%s' "$info" | json_get 'd["runs"][0]["status"]')
details=$(printf '%s' "$info" | json_get 'd["runs"][0]["status-details"]')
[ "$details" = "N/A" ] && details=""
echo "run $run_id: $status${details:+ ($details)}"
[ "$status" = "finished:completed" ]
