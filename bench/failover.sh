#!/usr/bin/env bash
# Faults under load, side by side: strangler and nginx as reverse proxies in front of the same
# three backend endpoints (plain nginx instances), while wrk keeps 200 connections busy. One
# endpoint is SIGKILLed and brought back, then another, on a fixed schedule; each proxy gets
# the same run. What counts: requests that failed (non-2xx answers and socket errors).
#
#   bench/failover.sh            40 s per proxy: kill endpoint 1 at 5 s, back at 15 s;
#                                endpoint 2 at 20 s, back at 30 s
#   bench/failover.sh --smoke    8 s per proxy: endpoint 1 killed at 2 s, back at 5 s
#   ROUNDS=3 bench/failover.sh   three rounds (proxies alternating)
#
# strangler: one backend with `endpoints`, `retries = 2`, active health checks every second.
# nginx: an `upstream` of the same three servers, keep-alive, the default proxy_next_upstream.
# Both with WORKERS workers (default 1). Installs nginx and wrk from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
ROUNDS=${ROUNDS:-1}; CONNS=${CONNS:-200}; WORKERS=${WORKERS:-1}; THREADS=${THREADS:-2}
if (( SMOKE )); then
  DURATION=8; SCHEDULE="2:kill:1 5:start:1"
else
  DURATION=${DURATION:-40}; SCHEDULE="5:kill:1 15:start:1 20:kill:2 30:start:2"
fi

source bench/lib.sh
install_missing "nginx wrk curl" "nginx wrk curl"
strangler_bin
work_dir

E=( "$(free_port)" "$(free_port)" "$(free_port)" )
NGINX_PROXY=$(free_port); STRANGLER=$(free_port); ADMIN=$(free_port)

declare -A ENDPOINT_PID
start_endpoint() {
  local i=$1 dir="$WORK/e$1"
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off; pid $dir/nginx.pid; error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:${E[$i]}; location / { default_type application/json; return 200 '{"endpoint": $i}'; } }
}
CONF
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" & ENDPOINT_PID[$i]=$!; PIDS+=($!)
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:${E[$i]}/" -o /dev/null && return; sleep 0.1; done
  echo "endpoint $i did not come up" >&2; exit 1
}
# SIGKILL to the master and its worker, as a crashed host or an OOM kill leaves them: the
# master first (a master that outlived its worker would start a new one), then the worker
# (it holds the connections; the kernel resets or closes each of them).
kill_endpoint() {
  local master=${ENDPOINT_PID[$1]} workers
  workers=$(pgrep -P "$master" || true)
  kill -KILL "$master" 2>/dev/null || true
  # shellcheck disable=SC2086 # a list of pids
  [[ -n $workers ]] && kill -KILL $workers 2>/dev/null || true
  wait "$master" 2>/dev/null || true
}
for i in 0 1 2; do start_endpoint "$i"; done

mkdir -p "$WORK/proxy"
nginx_proxy_conf "worker_processes $WORKERS;" 4096 \
  "server 127.0.0.1:${E[0]}; server 127.0.0.1:${E[1]}; server 127.0.0.1:${E[2]};" \
  > "$WORK/proxy/nginx.conf"
cat > "$WORK/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$STRANGLER"
admin = "127.0.0.1:$ADMIN"
workers = $WORKERS
access_log = false
[backends.legacy]
url = "http://127.0.0.1:${E[0]}"
endpoints = ["127.0.0.1:${E[0]}", "127.0.0.1:${E[1]}", "127.0.0.1:${E[2]}"]
retries = 2
health = { path = "/", interval = "1s" }
legacy = true
[[routes]]
prefix = "/"
backend = "legacy"
CONF
"$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" & PIDS+=($!)
RUST_LOG=info "$BIN" run --config "$WORK/routes.toml" --log-format json 2>"$WORK/strangler.log" & PIDS+=($!)
for port in $NGINX_PROXY $STRANGLER; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" -o /dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/" -o /dev/null || { echo "proxy on $port did not come up" >&2; cat "$WORK/strangler.log" >&2; exit 1; }
done

# Runs the schedule against the endpoints while wrk loads `port`; writes
# "requests failed non2xx socket_errors req_per_s" to $WORK/result. Not in a subshell: the
# endpoints it restarts must stay known to the next run and to the cleanup.
run_once() {
  local port=$1 started
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$port/" > "$WORK/wrk.out" 2>&1 &
  local wrk_pid=$!
  started=$(date +%s.%N)
  for step in $SCHEDULE; do
    IFS=: read -r at what i <<< "$step"
    sleep "$(python3 -c "import time; print(max(0.0, $started + $at - time.time()))")"
    if [[ $what == kill ]]; then kill_endpoint "$i"; else start_endpoint "$i"; fi
  done
  wait "$wrk_pid"
  python3 - "$WORK/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
reqs = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", t) or [0, 0])[1])
m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
sock = sum(int(x) for x in m.groups()) if m else 0
print(reqs, non2xx + sock, non2xx, sock, f"{rps:.0f}")
PY
} > "$WORK/result"

RESULTS=()
for round in $(seq "$ROUNDS"); do
  for target in strangler nginx; do
    port=$STRANGLER; [[ $target == nginx ]] && port=$NGINX_PROXY
    run_once "$port"
    read -r reqs failed non2xx sock rps < "$WORK/result"
    printf 'round %d %-9s %9d requests  %5d failed (%d non-2xx, %d socket errors)  %6s req/s\n' \
      "$round" "$target" "$reqs" "$failed" "$non2xx" "$sock" "$rps" >&2
    RESULTS+=("| $round | $target | $reqs | $failed | $non2xx | $sock | $rps |")
  done
done

echo
echo "Schedule: $SCHEDULE (seconds:action:endpoint), ${DURATION}s per run, wrk -t$THREADS -c$CONNS, WORKERS=$WORKERS"
echo
echo "| round | proxy | requests | failed | non-2xx | socket errors | req/s |"
echo "|---:|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${RESULTS[@]}"
echo
retried=$(curl -fs "http://127.0.0.1:$ADMIN/metrics" | awk '/^strangler_upstream_retries_total/ {print}' | tr '\n' ' ')
echo "strangler retries: $retried"
echo "strangler log lines: $(wc -l < "$WORK/strangler.log") ($(grep -c 'endpoint ejected' "$WORK/strangler.log" || true) ejections)"
# The endpoints' workers are grandchildren: stopped here, with their masters, so none
# outlives the run (holding the terminal or a CI log's pipe open).
for i in 0 1 2; do kill_endpoint "$i"; done
if (( SMOKE )); then echo "smoke run: harness OK"; fi
