#!/usr/bin/env bash
# Recovery benchmark: how long a supervised job takes from `kill -9` of one rank to the first
# update of its relaunch (the fault-tolerance issue's "recovery" number).
#
#   bench/recovery_bench.sh [--tandem PATH] [--np N] [--kill-at STEP] [--run-dir DIR]
#                           [--backoff S] -- CONFIG [tandem train args...]
#
# Starts `tandem run` (one agent, snapshots every update in skip mode) on CONFIG, waits until the
# heartbeat reaches --kill-at, kills the highest-numbered rank with SIGKILL, and waits for
# attempt 2 to print its first update. Prints one JSON line: the kill-to-first-update seconds,
# what attempt 2 resumed from, and its startup phases (the trainer's "startup" log line). The
# run directory is removed afterwards unless --keep is given. Needs python3 for the JSON.
set -euo pipefail

tandem=${TANDEM:-build/auto/bin/tandem}
np=1
kill_at=5
run_dir=runs/recovery-bench
backoff=1
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --tandem) tandem=$2; shift 2 ;;
    --np) np=$2; shift 2 ;;
    --kill-at) kill_at=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --backoff) backoff=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --) shift; break ;;
    *) echo "recovery_bench: unknown option '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ $# -ge 1 ] || { echo "recovery_bench: give the job after --: CONFIG [train args]" >&2; exit 2; }
[ -x "$tandem" ] || { echo "recovery_bench: no tandem binary at '$tandem' (--tandem PATH)" >&2; exit 2; }
[ -e "$run_dir" ] && { echo "recovery_bench: '$run_dir' exists; remove it or pass --run-dir" >&2; exit 2; }

log=$(mktemp)
"$tandem" run --np "$np" --run-dir "$run_dir" --backoff "$backoff" --max-restarts 2 -- "$@" \
  --set train.log_interval=1 --set "train.out_dir=\"$run_dir/train\"" \
  --set 'snapshot.when_busy="skip"' > "$log" 2>&1 &
sup=$!
cleanup() { kill "$sup" 2>/dev/null || true; wait "$sup" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

# Waits up to $1 seconds for the command in "${@:2}" to succeed.
wait_for() {
  local limit=$1; shift
  local end=$(( $(date +%s) + limit ))
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.05
  done
}
reached() { local s; s=$(cut -d' ' -f1 "$run_dir/heartbeat" 2>/dev/null || true); [ "${s:-0}" -ge "$kill_at" ] 2>/dev/null; }
wait_for 900 reached || { echo "recovery_bench: the job never reached step $kill_at" >&2; cat "$log" >&2; exit 1; }

victim=""
for p in $(pgrep -f "tandem train" || true); do
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = tandem ] && victim=$p
done
[ -n "$victim" ] || { echo "recovery_bench: no trainer process found" >&2; exit 1; }
t_kill=$(date +%s.%N)
kill -9 "$victim"
first_update() { grep -qE '^step +[0-9]+/' "$run_dir/logs/attempt-2.log" 2>/dev/null; }
wait_for 900 first_update || { echo "recovery_bench: attempt 2 made no update" >&2; cat "$log" >&2; exit 1; }
t_first=$(date +%s.%N)
wait "$sup" || true
trap - EXIT
rm -f "$log"

python3 - "$run_dir/logs/attempt-2.log" "$t_kill" "$t_first" "$np" "$kill_at" <<'PY'
import json, re, sys
log, t_kill, t_first, np, kill_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
text = open(log, errors="replace").read()
resumed = re.search(r"resumed from (.*)", text)
startup = re.search(r"startup ([0-9.]+) s: (.*)", text)
print(json.dumps({
    "bench": "recovery", "np": np, "killed_at_step": kill_at,
    "kill_to_first_update_s": round(t_first - t_kill, 2),
    "resumed_from": resumed.group(1).strip() if resumed else None,
    "startup_s": float(startup.group(1)) if startup else None,
    "startup_phases": startup.group(2).strip() if startup else None,
}))
PY
[ "$keep" = 1 ] || rm -rf "$run_dir"
