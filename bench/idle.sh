#!/usr/bin/env bash
# Memory per idle keep-alive client connection: strangler and nginx as a reverse proxy, side by
# side in one run.
#
#   bench/idle.sh                    N=1000 and N=20000 idle connections, strangler and nginx
#   bench/idle.sh --smoke            N=500, strangler only, fails above BUDGET (default 16 KiB)
#   NS="1000 5000 20000" bench/idle.sh
#                                    the connection counts to measure
#   BUDGET=16 bench/idle.sh          exit 1 when strangler holds more than BUDGET KiB per idle
#                                    connection, fresh or after one request (a CI gate)
#   BIN=/path/to/strangler bench/idle.sh
#                                    measure that binary (default: cargo build --release)
#   WORKERS=1 C=32                   strangler's worker threads (= nginx's worker processes, 1);
#                                    requests in flight at once in the request phase
#   MIMALLOC_ALLOW_THP=1 bench/idle.sh
#                                    strangler with transparent huge pages left on (it turns
#                                    them off at start otherwise; see src/main.rs)
#
# Method (bench/idle_client.py): for each N, both proxies start fresh, with one worker and the
# same nginx backend (a 1 KiB JSON answer). The client warms the proxy up (2,000 requests over
# C connections, then closed), reads the proxy's VmRSS, opens N keep-alive connections, waits
# until the proxy holds all N (its open file descriptors) and its RSS stops moving, reads VmRSS
# again ("fresh": connected, not a byte sent), then sends one GET on each connection (C at a
# time, each answer read whole), leaves them idle and reads VmRSS a third time ("after one
# request"). Per connection = (RSS - baseline) / N. The client then checks that the proxy closed
# none of them. RSS is what the kernel holds resident for the process: the kernel's own socket
# buffers are not in it (they are the same for every proxy), allocator slack is.
#
# Both proxies are configured to keep idle connections open for the whole run: strangler with
# header_read_timeout = "300s" and max_connections above N, nginx with keepalive_timeout and
# client_header_timeout of 300s. Raises `ulimit -n` (as root, the hard limit too) to fit N; where
# the hard limit cannot be raised (a container without CAP_SYS_RESOURCE) N is capped to fit under
# it, and the table shows the N measured. Installs nginx from Debian's packages when missing.
# Everything listens on 127.0.0.1. Writes no file in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
NS=${NS:-1000 20000}; WORKERS=${WORKERS:-1}; C=${C:-32}; BUDGET=${BUDGET:-}
if (( SMOKE )); then NS=500; BUDGET=${BUDGET:-16}; fi

source bench/lib.sh
install_missing "nginx curl" "nginx curl"

strangler_bin

# File descriptors: N client sockets in the client, N accepted ones in the proxy, plus the
# proxy's own (listeners, C upstream connections, the runtime's): RESERVE more than N.
RESERVE=$(( C + 64 ))
MAX_N=0
for n in $NS; do (( n > MAX_N )) && MAX_N=$n; done
NOFILE=$(( MAX_N + RESERVE ))
if [[ $(ulimit -Hn) != unlimited ]] && (( $(ulimit -Hn) < NOFILE )); then
  ulimit -Hn "$NOFILE" 2>/dev/null || true
fi
if [[ $(ulimit -Hn) != unlimited ]] && (( $(ulimit -Hn) < NOFILE )); then
  # Without CAP_SYS_RESOURCE (a container) the hard limit stays: measure as many as fit.
  NOFILE=$(ulimit -Hn)
  echo "ulimit -n cannot go above $NOFILE here: N is capped at $(( NOFILE - RESERVE ))" >&2
fi
ulimit -n "$NOFILE"

work_dir

BACKEND=$(free_port)
BODY=$(python3 -c '
import json
items = [{"id": i, "name": f"user{i}", "plan": "free"} for i in range(20)]
b = json.dumps({"users": items})
print(b + " " * (1023 - len(b)))')

mkdir -p "$WORK/backend" "$WORK/nginx"
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1; worker_rlimit_nofile 8192;
daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 600s;
  default_type application/json;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 '$BODY'; } }
}
CONF
"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)

# Waits for an answer from port $1.
up() {
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$1/" -o /dev/null && return 0; sleep 0.1; done
  echo "nothing answers on port $1" >&2; cat "$WORK"/*.log "$WORK"/*/error.log >&2 || true; exit 1
}
up "$BACKEND"

# Runs the client against pid $1 on port $2 for N=$3, labelled $4; appends its line to results.
measure() {
  local out
  out=$(python3 bench/idle_client.py --pid "$1" --port "$2" -n "$3" --concurrency "$C" --label "$4") ||
    { echo "idle_client failed for $4 N=$3" >&2; echo "$out" >&2; exit 1; }
  echo "  $out" >&2
  echo "$out" >>"$WORK/results"
}

for n in $NS; do
  (( n > NOFILE - RESERVE )) && n=$(( NOFILE - RESERVE ))
  STRANGLER=$(free_port); ADMIN=$(free_port)
  cat > "$WORK/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$STRANGLER"
admin = "127.0.0.1:$ADMIN"
workers = $WORKERS
access_log = false
watch = "off"
max_connections = $(( n + RESERVE ))
header_read_timeout = "300s"
[backends.legacy]
url = "http://127.0.0.1:$BACKEND"
legacy = true
[[routes]]
prefix = "/"
backend = "legacy"
CONF
  RUST_LOG=warn "$BIN" run --config "$WORK/routes.toml" --log-format json 2>>"$WORK/strangler.log" &
  pid=$!; PIDS+=($pid)
  up "$STRANGLER"
  echo "strangler, N=$n:" >&2
  measure "$pid" "$STRANGLER" "$n" strangler
  kill "$pid"; wait "$pid" 2>/dev/null || true

  (( SMOKE )) && continue
  PROXY=$(free_port)
  cat > "$WORK/nginx/nginx.conf" <<CONF
master_process off; worker_processes 1; worker_rlimit_nofile $NOFILE;
daemon off; pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections $(( 2 * NOFILE )); }   # it closes idle keep-alive ones past 15/16 of it
http {
  access_log off; keepalive_requests 1000000;
  keepalive_timeout 300s; client_header_timeout 300s;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 256; }
  server {
    listen 127.0.0.1:$PROXY;
$(nginx_proxy_location)
  }
}
CONF
  "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" 2>>"$WORK/nginx.log" & pid=$!; PIDS+=($pid)
  up "$PROXY"
  echo "nginx, N=$n:" >&2
  measure "$pid" "$PROXY" "$n" nginx
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo
echo "| proxy | N | fresh idle, KiB per connection | idle after one request, KiB per connection |"
echo "|---|---:|---:|---:|"
fail=0
while read -r line; do
  declare -A r=()
  for kv in $line; do r[${kv%%=*}]=${kv#*=}; done
  printf '| %s | %d | %s | %s |\n' "${r[label]}" "${r[n]}" "${r[fresh_per_conn_kib]}" "${r[used_per_conn_kib]}"
  if [[ -n $BUDGET && ${r[label]} == strangler ]]; then
    for f in fresh_per_conn_kib used_per_conn_kib; do
      if python3 -c "import sys; sys.exit(0 if ${r[$f]} > $BUDGET else 1)"; then
        what=$([[ $f == fresh* ]] && echo "fresh idle" || echo "idle after one request")
        echo "strangler N=${r[n]}: ${r[$f]} KiB per connection ($what) is over the budget of $BUDGET KiB" >&2
        fail=1
      fi
    done
  fi
done <"$WORK/results"
exit $fail
