#!/bin/sh
# A stand-in for `tandem train` in the supervisor tests (tests/launch/supervisor_test.cc). It is
# started as `fake_job.sh train PLAN [args] --resume --set ... --set train.heartbeat_file=HB`
# and honours the trainer's side of the supervisor contract: rank 0 rewrites HB with
# "<step> <unix time>" after every step. Line N of PLAN says what attempt N ($TANDEM_ATTEMPT)
# does (no line: ok):
#   ok        3 steps, every rank exits 0
#   fail      1 step; the last rank exits 3, the others wait forever (as in a collective)
#   hang      1 step, then every rank waits forever
#   stop      the last rank stops itself (SIGSTOP); rank 0 keeps beating
#   waitfail  rank 0 beats, waits for the file PLAN.go, removes it and exits 3
# Every rank starts a background `sleep` (a grandchild of the launcher) and appends
# "<its pid> <child pid>" to PLAN.pids, so the test can check nothing outlives a teardown.
plan=$2
hb=""
for a in "$@"; do
  case "$a" in train.heartbeat_file=*) hb=${a#train.heartbeat_file=} ;; esac
done
rank=${OMPI_COMM_WORLD_RANK:-0}
size=${OMPI_COMM_WORLD_SIZE:-1}
attempt=${TANDEM_ATTEMPT:-1}
action=$(sed -n "${attempt}p" "$plan")
[ -z "$action" ] && action=ok
sleep 300 < /dev/null > /dev/null 2>&1 &
echo "$$ $!" >> "$plan.pids"
[ "$rank" = 0 ] && echo "$@" > "$plan.args-$attempt"
last=$((size - 1))
beat() {
  if [ "$rank" = 0 ]; then
    echo "$1 $(date +%s)" > "$hb.tmp" && mv "$hb.tmp" "$hb"
  fi
}
case $action in
  ok)
    for s in 1 2 3; do beat $s; sleep 0.1; done
    exit 0 ;;
  fail)
    beat 1
    if [ "$rank" = "$last" ]; then sleep 0.2; exit 3; fi
    exec sleep 300 ;;
  hang)
    beat 1
    exec sleep 300 ;;
  stop)
    [ "$rank" = "$last" ] && kill -STOP $$
    s=0
    while :; do s=$((s + 1)); beat $s; sleep 0.2; done ;;
  waitfail)
    beat 1
    if [ "$rank" = 0 ]; then
      while [ ! -e "$plan.go" ]; do sleep 0.05; done
      rm -f "$plan.go"
      exit 3
    fi
    exec sleep 300 ;;
esac
echo "fake_job: unknown action '$action' in $plan" >&2
exit 99
