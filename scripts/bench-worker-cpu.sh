#!/usr/bin/env bash
# CPU seconds per channel job, by process: runs one `herald bench workers` row with 60,000
# jobs and reads utime+stime of the worker, the nats-server and the bench process (which
# hosts the provider fakes) from /proc ten seconds apart while it runs. Unlike jobs/s this
# barely depends on what else the machine is doing, so it says what two idle cores allow.
#   scripts/bench-worker-cpu.sh webhook 0      # provider, latency in ms
#   JOBS=200000 scripts/bench-worker-cpu.sh    # more jobs when a row drains in under ~15 s
#   WORKER_BIN=/tmp/herald-before scripts/bench-worker-cpu.sh   # another build's worker
set -euo pipefail
prov=${1:-webhook}; lat=${2:-0}
bin=${HERALD_BIN:-target/release/herald}
log=$(mktemp)
"$bin" bench workers --providers "$prov" --latency-ms "$lat" --jobs "${JOBS:-60000}" \
  ${WORKER_BIN:+--worker-bin "$WORKER_BIN"} >/dev/null 2>"$log" &
bench=$!
ticks() { local t=0 s; for p in "$@"; do read -r -a s < <(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null || echo "0 0"); t=$((t + s[0] + s[1])); done; echo "$t"; }
sent() { grep "sent," "$log" | tail -1 | sed 's/.*: \([0-9]*\) sent.*/\1/'; }
until grep -q "sent," "$log"; do
  if ! kill -0 "$bench" 2>/dev/null; then
    echo "the bench ended before its row reported progress; raise JOBS (now ${JOBS:-60000}) or read its log:" >&2
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  sleep 0.5
done
worker=$(pgrep -P "$bench" -f " worker "); nats=$(pgrep -P "$bench" nats-server)
a_s=$(sent); a_w=$(ticks "$worker"); a_n=$(ticks "$nats"); a_b=$(ticks "$bench")
sleep 10
b_s=$(sent); b_w=$(ticks "$worker"); b_n=$(ticks "$nats"); b_b=$(ticks "$bench")
if ! kill -0 "$worker" 2>/dev/null; then
  echo "the row drained within the 10 s window, so its CPU cannot be read; raise JOBS (now ${JOBS:-60000})" >&2
  wait "$bench"; rm -f "$log"; exit 1
fi
jobs=$((b_s - a_s)); hz=$(getconf CLK_TCK)
us() { echo $(( ($1) * 1000000 / hz / jobs )); }
echo "$prov ${lat} ms: $jobs jobs in 10 s; CPU µs per job: total $(us "b_w-a_w+b_n-a_n+b_b-a_b")" \
  "(worker $(us "b_w-a_w"), nats-server $(us "b_n-a_n"), bench + fakes $(us "b_b-a_b"))"
wait "$bench"
rm -f "$log"
