#!/usr/bin/env bash
# strangler benchmark: direct vs through strangler vs through nginx, side by side.
#
#   bench/run.sh            full run (5 rounds x 10 s per target), writes bench/RESULTS.md
#   bench/run.sh --smoke    one short round, checks the harness works; writes nothing
#   BASELINE=/path/to/other/strangler bench/run.sh
#                           adds that build as a fourth target, interleaved with the others,
#                           and prints strangler / baseline (a regression check between
#                           commits on one machine, in one run); writes nothing
#
# Installs its own tools (nginx, wrk from Debian's packages). Everything listens on loopback.
# The backend is nginx answering a 1 KiB JSON body. The proxies get the same worker count
# (nginx worker_processes = strangler's tokio worker threads = WORKERS) and upstream
# keep-alive. Rounds interleave the targets so drift hits all of them alike; figures are
# medians over rounds. CPU is the proxy's user+system time from /proc, per 10k requests.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
ROUNDS=${ROUNDS:-5}; DURATION=${DURATION:-10}; CONNS=${CONNS:-64}; WORKERS=${WORKERS:-1}; THREADS=${THREADS:-1}
if (( SMOKE )); then ROUNDS=1; DURATION=2; fi

source bench/lib.sh
install_missing "nginx wrk" "nginx wrk"

cargo build --release -q --bin strangler
BIN=target/release/strangler

work_dir

BACKEND=$(free_port); NGINX_PROXY=$(free_port); STRANGLER=$(free_port); ADMIN=$(free_port)
BASELINE=${BASELINE:-}; BASE_PORT=$(free_port); BASE_ADMIN=$(free_port)
TARGETS="direct strangler nginx"; [[ -n $BASELINE ]] && TARGETS+=" baseline"

python3 - "$WORK/body.json" <<'PY'
import json, sys
items = [{"id": i, "name": f"user{i}", "plan": "free"} for i in range(20)]
body = json.dumps({"users": items})
body = body + " " * (1024 - len(body) - 1) + "\n" if len(body) < 1024 else body[:1023] + "\n"
open(sys.argv[1], "w").write(body)
PY

mkdir -p "$WORK/backend" "$WORK/proxy"
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND; location / { default_type application/json; return 200 '$(cat "$WORK/body.json")'; } }
}
CONF
nginx_proxy_conf "worker_processes $WORKERS;" 4096 "server 127.0.0.1:$BACKEND;" \
  > "$WORK/proxy/nginx.conf"
cat > "$WORK/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$STRANGLER"
admin = "127.0.0.1:$ADMIN"
workers = $WORKERS
access_log = false
[backends.legacy]
url = "http://127.0.0.1:$BACKEND"
legacy = true
[[routes]]
prefix = "/api/users"
backend = "legacy"
[[routes]]
prefix = "/"
backend = "legacy"
CONF

"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
"$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" & NGINX_PID=$!; PIDS+=($NGINX_PID)
RUST_LOG=warn "$BIN" run --config "$WORK/routes.toml" --log-format json 2>"$WORK/strangler.log" & STRANGLER_PID=$!; PIDS+=($STRANGLER_PID)
PORTS="$BACKEND $NGINX_PROXY $STRANGLER"
if [[ -n $BASELINE ]]; then
  sed -e "s/127.0.0.1:$STRANGLER/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$ADMIN/127.0.0.1:$BASE_ADMIN/" "$WORK/routes.toml" > "$WORK/baseline.toml"
  RUST_LOG=warn "$BASELINE" run --config "$WORK/baseline.toml" --log-format json 2>"$WORK/baseline.log" & BASE_PID=$!; PIDS+=($BASE_PID)
  PORTS+=" $BASE_PORT"
fi

for port in $PORTS; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/api/users" -o /dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/api/users" -o /dev/null || { echo "target on port $port did not come up" >&2; cat "$WORK"/*.log "$WORK"/*/error.log >&2 || true; exit 1; }
done

TICK=$(getconf CLK_TCK)
# CPU ticks (user+system) of a process and its children processes (nginx workers).
cpu_ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    [[ -r /proc/$p/stat ]] || continue
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$total"
}
# wrk -> "req_per_s p50_ms p99_ms requests"
measure() {
  wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$1/api/users" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(label):
    m = re.search(r"^\s*" + label + r"%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
reqs = int(re.search(r"(\d+) requests in", t).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", t)
if errors: sys.stderr.write("wrk reported errors: " + errors.group(0) + "\n")
def rps_fmt(rps, p50, p99, reqs): return "%.0f %.3f %.3f %d" % (rps, p50, p99, reqs)
print(rps_fmt(rps, ms("50"), ms("99"), reqs))'
}

declare -A RPS P50 P99 CPU
for round in $(seq "$ROUNDS"); do
  for target in $TARGETS; do
    case $target in
      direct) port=$BACKEND; pid="" ;;
      strangler) port=$STRANGLER; pid=$STRANGLER_PID ;;
      nginx) port=$NGINX_PROXY; pid=$NGINX_PID ;;
      baseline) port=$BASE_PORT; pid=$BASE_PID ;;
    esac
    before=0; [[ -n $pid ]] && before=$(cpu_ticks "$pid")
    read -r rps p50 p99 reqs < <(measure "$port")
    cpu="-"
    if [[ -n $pid ]]; then
      after=$(cpu_ticks "$pid")
      cpu=$(python3 -c "print(f'{($after - $before) / $TICK / $reqs * 10000:.3f}')")
    fi
    RPS[$target]+="$rps "; P50[$target]+="$p50 "; P99[$target]+="$p99 "; CPU[$target]+="$cpu "
    printf 'round %d %-9s %8s req/s  p50 %6s ms  p99 %6s ms  cpu %s s/10k\n' "$round" "$target" "$rps" "$p50" "$p99" "$cpu" >&2
  done
done

median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:] if x != "-"]; print(f"{statistics.median(v):.3f}" if v else "-")' "$@"; }
TABLE="| target | req/s | p50 ms | p99 ms | proxy CPU s per 10k req |
|---|---:|---:|---:|---:|"
for target in $TARGETS; do
  TABLE+=$'\n'"| $target | $(median ${RPS[$target]}) | $(median ${P50[$target]}) | $(median ${P99[$target]}) | $(median ${CPU[$target]}) |"
done
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
S_RPS=$(median ${RPS[strangler]}); D_RPS=$(median ${RPS[direct]}); N_RPS=$(median ${RPS[nginx]})
S_CPU=$(median ${CPU[strangler]}); N_CPU=$(median ${CPU[nginx]})
S_P99=$(median ${P99[strangler]}); N_P99=$(median ${P99[nginx]})
RATIOS="- req/s strangler / direct: $(ratio "$S_RPS" "$D_RPS")
- req/s strangler / nginx: $(ratio "$S_RPS" "$N_RPS")
- p99 strangler / nginx: $(ratio "$S_P99" "$N_P99")
- CPU per request strangler / nginx: $(ratio "$S_CPU" "$N_CPU")"
echo
echo "$TABLE"
echo
echo "$RATIOS"

if [[ -n $BASELINE ]]; then
  B_RPS=$(median ${RPS[baseline]}); B_CPU=$(median ${CPU[baseline]}); B_P99=$(median ${P99[baseline]})
  echo "- req/s strangler / baseline: $(ratio "$S_RPS" "$B_RPS")"
  echo "- p99 strangler / baseline: $(ratio "$S_P99" "$B_P99")"
  echo "- CPU per request strangler / baseline: $(ratio "$S_CPU" "$B_CPU")"
  echo "baseline run: RESULTS.md untouched"
  exit 0
fi
if (( SMOKE )); then
  echo "smoke run: harness OK (figures from a 2 s round are not results; RESULTS.md untouched)"
  exit 0
fi
# Other sections of RESULTS.md (instruction counts, memory) are kept as they are.
OTHERS=$(awk '/^## /{keep = ($0 !~ /^## Wall clock/)} keep' bench/RESULTS.md 2>/dev/null || true)
{
  echo "# Benchmark results"
  echo
  echo "## Wall clock (\`bench/run.sh\`)"
  echo
  echo "Command: \`bench/run.sh\` (ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS WORKERS=$WORKERS wrk threads=$THREADS)"
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'); $(date -u +%Y-%m-%d)"
  echo "Backend: nginx (1 worker) answering a 1 KiB JSON body; each proxy forwards GET /api/users to it with upstream keep-alive."
  echo "All of wrk, the backend and the proxy share the same $(nproc) cores; figures are medians over interleaved rounds."
  echo
  echo "$TABLE"
  echo
  echo "$RATIOS"
  if [[ -n $OTHERS ]]; then
    echo
    echo "$OTHERS"
  fi
} > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
