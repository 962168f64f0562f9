#!/bin/sh
# A stand-in for mpirun in the supervisor tests: runs -np N copies of the program on this host
# with OMPI_COMM_WORLD_RANK/SIZE set and ignores placement flags, appending every --host value to
# "$0.hosts" (so a test can see where the supervisor placed agents and requests). With -np 1 it
# execs the program (its pid is the program's). With N > 1 it waits for rank 0 first: when that
# fails, it kills the other ranks and exits with rank 0's code (enough for fake_job.sh's
# "waitfail" and "ok" actions).
np=1
while [ $# -gt 0 ]; do
  case "$1" in
    -np) np=$2; shift 2 ;;
    --host) echo "$2" >> "$0.hosts"; shift 2 ;;
    --hostfile | --map-by | -x | --bind-to) shift 2 ;;
    --allow-run-as-root | --oversubscribe) shift ;;
    *) break ;;
  esac
done
export OMPI_COMM_WORLD_SIZE=$np
if [ "$np" = 1 ]; then
  export OMPI_COMM_WORLD_RANK=0
  exec "$@"
fi
pids=""
i=0
while [ $i -lt "$np" ]; do
  OMPI_COMM_WORLD_RANK=$i "$@" &
  pids="$pids $!"
  i=$((i + 1))
done
set -- $pids
first=$1
shift
wait "$first"
rc=$?
if [ $rc -ne 0 ]; then
  kill -9 "$@" 2>/dev/null
  exit $rc
fi
for p in "$@"; do wait "$p" || exit $?; done
exit 0
