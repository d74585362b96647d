#!/usr/bin/env bash
# Connection storm, side by side: strangler and nginx as reverse proxies in front of the same
# nginx backend, each hit by h2load opening CONNS keep-alive HTTP/1.1 connections at once (as
# many as the open-file limit allows, 8,000 at most) and sending PER_CONN (20) requests on each.
#
#   bench/storm.sh             ROUNDS=5 interleaved rounds (strangler and nginx alternating
#                              which goes first), per-round lines, a summary table (medians and
#                              maxima over rounds) and the verdicts against the targets below;
#                              exits 0 whatever the figures (a measurement)
#   bench/storm.sh --smoke     CONNS=2000, one round; exits 1 when strangler failed a request
#                              or answered anything but 2xx (the CI check)
#   BIN=/path/to/strangler bench/storm.sh
#                              measure that binary (default: cargo build --release)
#   CONNS=4000 ROUNDS=3 WORKERS=1 THREADS=2 PER_CONN=20 PAUSE=3 BACKEND_BACKLOG=511 bench/storm.sh
#                              connections (default: min(8000, (ulimit -n - 1000) / 2.2));
#                              rounds; proxy workers (nginx worker_processes = strangler's
#                              workers); h2load threads; requests per connection; seconds of
#                              rest before each run (TIME_WAIT and accept queues settle); the
#                              backend's listen backlog (511: nginx's default)
#   STRANGLER_BACKLOG=511 bench/storm.sh
#                              strangler's `[server] backlog` (default: unset, so somaxconn);
#                              511 compares its accept loop with nginx's on equal queues
#
# Load: h2load --h1 -c CONNS -n CONNS*PER_CONN -t THREADS http://127.0.0.1:PORT/api/users
# (every connection is opened at the start, then kept alive). Per run it reports:
#   - connect time mean and max, request time mean and max: h2load's "time for connect" and
#     "time for request" lines (columns min max mean sd)
#   - requests per second ("finished in ..., N req/s"), failed requests ("requests: ... N
#     failed", which counts errored and timed-out ones too), non-2xx answers (the status codes
#     line: 3xx + 4xx + 5xx)
#   - listen overflows: the TcpExtListenOverflows delta (nstat) across the run. The counter is
#     the network namespace's, not the proxy's listener's: an overflow of the backend's
#     listener counts too (a proxy that opens thousands of upstream connections at once fills
#     the backend's 511), as would one of anything else running on the machine.
#     BACKEND_BACKLOG=4096 gives the backend a queue the storm cannot fill, so what is left is
#     the proxy's own listener
#   - the proxy's peak RSS: VmHWM from /proc/PID/status, the peak since the proxy started (both
#     proxies run for the whole benchmark, so the figure after the last round is the peak over
#     all of them). For nginx, the worker process(es) (summed when WORKERS > 1): the master
#     serves no connection
# and, once, the listen backlog each proxy listens with (ss -ltn: Send-Q of the listening
# socket; the kernel caps it at net.core.somaxconn).
#
# Targets (printed as verdicts for strangler): zero failed requests and zero listen overflows in
# every round; connect and request maxima (worst round) within 1.5x nginx's; requests per second
# (median) at least nginx's.
#
# Setup: the backend is nginx (1 worker, keep-alive, listen backlog BACKEND_BACKLOG)
# answering a small JSON body. nginx as proxy: an upstream with `keepalive 256` and
# bench/lib.sh's location; worker_connections 2*CONNS+1000 (client plus upstream connections).
# strangler: one legacy backend, route "/", access_log off, max_connections above CONNS (so the
# limit does not queue the storm). The script raises its open-file limit to the hard limit;
# every process inherits it (the proxy holds CONNS client sockets plus as many upstream ones).
# Installs nginx, h2load (nghttp2-client) and nstat/ss (iproute2) from Debian's packages when
# missing. Everything listens on 127.0.0.1. Writes no file in the repository (KEEP=1 keeps the
# scratch directory with h2load's outputs).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
ROUNDS=${ROUNDS:-5}; WORKERS=${WORKERS:-1}; THREADS=${THREADS:-2}; PER_CONN=${PER_CONN:-20}
PAUSE=${PAUSE:-3}; BACKEND_BACKLOG=${BACKEND_BACKLOG:-511}; STRANGLER_BACKLOG=${STRANGLER_BACKLOG:-}
if (( SMOKE )); then ROUNDS=1; PAUSE=2; fi

source bench/lib.sh
install_missing "nginx h2load nstat ss curl" "nginx nghttp2-client iproute2 curl"

# The open-file limit: as high as the hard limit allows (every process started here inherits it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
LIMIT=$(ulimit -n)
[[ $LIMIT == unlimited ]] && LIMIT=$(cat /proc/sys/fs/nr_open)
# The proxy holds each client connection and, at worst, one upstream connection per client
# connection at once; 1000 left for the rest (listeners, the runtime, the backend's idle ones).
FIT=$(( (LIMIT - 1000) * 10 / 22 ))
if (( FIT < 100 )); then echo "ulimit -n is $LIMIT: too low for a storm" >&2; exit 1; fi
DEFAULT_CONNS=8000; (( SMOKE )) && DEFAULT_CONNS=2000
(( DEFAULT_CONNS > FIT )) && DEFAULT_CONNS=$FIT
CONNS=${CONNS:-$DEFAULT_CONNS}
if (( CONNS > FIT )); then
  echo "warning: CONNS=$CONNS is more than fits under ulimit -n $LIMIT ($FIT): expect failed connections" >&2
fi
REQUESTS=$(( CONNS * PER_CONN ))
# nginx's connection slots per worker: the clients' plus the upstream ones. strangler's
# max_connections: above CONNS, so it never stops accepting during the storm.
NGINX_CONNECTIONS=$(( 2 * CONNS + 1000 ))
MAX_CONNECTIONS=$(( CONNS + 1000 > 20000 ? CONNS + 1000 : 20000 ))

strangler_bin
work_dir

BACKEND=$(free_port); NGINX_PROXY=$(free_port); STRANGLER=$(free_port); ADMIN=$(free_port)
BODY='{"users":[{"id":1,"name":"ada","plan":"pro"},{"id":2,"name":"grace","plan":"free"}]}'

mkdir -p "$WORK/backend" "$WORK/proxy"
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;
events { worker_connections $NGINX_CONNECTIONS; }
http {
  access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$BACKEND backlog=$BACKEND_BACKLOG; location / { default_type application/json; return 200 '$BODY'; } }
}
CONF
nginx_proxy_conf "worker_processes $WORKERS;" "$NGINX_CONNECTIONS" "server 127.0.0.1:$BACKEND;" \
  > "$WORK/proxy/nginx.conf"
cat > "$WORK/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$STRANGLER"
admin = "127.0.0.1:$ADMIN"
workers = $WORKERS
access_log = false
max_connections = $MAX_CONNECTIONS
${STRANGLER_BACKLOG:+backlog = $STRANGLER_BACKLOG}
[backends.legacy]
url = "http://127.0.0.1:$BACKEND"
legacy = true
[[routes]]
prefix = "/"
backend = "legacy"
CONF

"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
"$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" & NGINX_PID=$!; PIDS+=("$NGINX_PID")
RUST_LOG=warn "$BIN" run --config "$WORK/routes.toml" --log-format json 2>"$WORK/strangler.log" & STRANGLER_PID=$!; PIDS+=("$STRANGLER_PID")
for port in $BACKEND $NGINX_PROXY $STRANGLER; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/api/users" -o /dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/api/users" -o /dev/null || {
    echo "target on port $port did not come up" >&2
    cat "$WORK/strangler.log" "$WORK"/*/error.log >&2 || true
    exit 1
  }
done

# The listen backlog of the socket listening on a port (Send-Q of a LISTEN socket in ss).
backlog() { ss -Hltn "sport = :$1" | awk '{print $3; exit}'; }
# The network namespace's TcpExtListenOverflows (absolute, without touching nstat's history).
overflows() { nstat -asz TcpExtListenOverflows | awk '$1 == "TcpExtListenOverflows" {print $2; f=1} END {if (!f) print 0}'; }
# Peak RSS in KiB: strangler's process; nginx's worker(s), summed.
peak_rss() {
  local pids=$2 p total=0
  [[ $1 == nginx ]] && pids=$(pgrep -P "$2" || true)
  for p in $pids; do
    total=$(( total + $(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}

# h2load's output -> "req_per_s connect_mean connect_max request_mean request_max failed
# errored timeout non2xx s5xx done" (times in ms). Fails (and shows the output) when a line is missing.
parse_h2load() {
  python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def need(pattern):
    m = re.search(pattern, t, re.M)
    if not m:
        sys.stderr.write(f"h2load output without /{pattern}/:\n{t}\n")
        sys.exit(1)
    return m
def ms(v):
    n, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(need(r"^finished in [\d.]+\w+, ([\d.]+) req/s").group(1))
r = need(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")
done, failed = int(r.group(3)), int(r.group(5))
s = need(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
non2xx = int(s.group(2)) + int(s.group(3)) + int(s.group(4))
time = r"\s+([\d.]+(?:us|ms|s))" * 4
req = need(r"^time for request:" + time)
con = need(r"^time (?:for|to) connect:" + time)
print(f"{rps:.0f} {ms(con.group(3)):.2f} {ms(con.group(2)):.2f} {ms(req.group(3)):.2f} "
      f"{ms(req.group(2)):.2f} {failed} {r.group(6)} {r.group(7)} {non2xx} {s.group(4)} {done}")
PY
}

declare -A BACKLOG PIDOF RPS CMEAN CMAX RMEAN RMAX FAILED NON2XX OVER
PIDOF[strangler]=$STRANGLER_PID; PIDOF[nginx]=$NGINX_PID
BACKLOG[strangler]=$(backlog "$STRANGLER"); BACKLOG[nginx]=$(backlog "$NGINX_PROXY")
echo "storm: $CONNS connections at once, $REQUESTS requests (h2load -t$THREADS), WORKERS=$WORKERS, ROUNDS=$ROUNDS, ulimit -n $LIMIT, somaxconn $(cat /proc/sys/net/core/somaxconn)" >&2
echo "listen backlog: strangler ${BACKLOG[strangler]}, nginx ${BACKLOG[nginx]}, backend $(backlog "$BACKEND")" >&2

for round in $(seq "$ROUNDS"); do
  order="strangler nginx"; (( round % 2 == 0 )) && order="nginx strangler"
  for target in $order; do
    port=$STRANGLER; [[ $target == nginx ]] && port=$NGINX_PROXY
    out="$WORK/h2load.$round.$target.out"
    sleep "$PAUSE"
    before=$(overflows)
    h2load --h1 -c "$CONNS" -n "$REQUESTS" -t "$THREADS" "http://127.0.0.1:$port/api/users" > "$out" 2>&1 || true
    after=$(overflows)
    read -r rps cmean cmax rmean rmax failed errored timeout non2xx s5xx finished < <(parse_h2load "$out")
    over=$(( after - before ))
    rss=$(peak_rss "$target" "${PIDOF[$target]}")
    RPS[$target]+="$rps "; CMEAN[$target]+="$cmean "; CMAX[$target]+="$cmax "
    RMEAN[$target]+="$rmean "; RMAX[$target]+="$rmax "
    FAILED[$target]+="$failed "; NON2XX[$target]+="$non2xx "; OVER[$target]+="$over "
    printf 'round %d %-9s connect %8s / %8s ms  request %8s / %8s ms (mean / max)  %6s req/s  %d/%d done  %d failed (%d errored, %d timeout)  %d non-2xx (%d 5xx)  %d listen overflows  peak RSS %d KiB\n' \
      "$round" "$target" "$cmean" "$cmax" "$rmean" "$rmax" "$rps" "$finished" "$REQUESTS" "$failed" "$errored" "$timeout" "$non2xx" "$s5xx" "$over" "$rss" >&2
  done
done

# "median" or "max" or "sum" of numbers.
agg() { python3 -c '
import statistics, sys
f, v = sys.argv[1], [float(x) for x in sys.argv[2:]]
r = {"median": statistics.median, "max": max, "sum": sum}[f](v)
print(f"{r:.0f}" if f == "sum" or r >= 100 else f"{r:.1f}")' "$@"; }
# shellcheck disable=SC2086 # lists of numbers
summary() {
  local t=$1 o
  S_CMEAN=$(agg median ${CMEAN[$t]}); S_CMAX=$(agg max ${CMAX[$t]})
  S_RMEAN=$(agg median ${RMEAN[$t]}); S_RMAX=$(agg max ${RMAX[$t]})
  S_RPS=$(agg median ${RPS[$t]}); S_FAILED=$(agg sum ${FAILED[$t]})
  S_NON2XX=$(agg sum ${NON2XX[$t]}); S_OVER=$(agg sum ${OVER[$t]})
  S_OVER_MAX=0; for o in ${OVER[$t]}; do (( o > S_OVER_MAX )) && S_OVER_MAX=$o; done
  S_RSS=$(peak_rss "$t" "${PIDOF[$t]}")
}
echo
echo "Connection storm: $CONNS connections at once, $PER_CONN requests each (h2load --h1 -t$THREADS), WORKERS=$WORKERS, $ROUNDS round(s)."
echo "Times in ms: means are medians over rounds, maxima the worst round's; req/s median; failed, non-2xx and overflows summed over rounds."
echo "Peak RSS: VmHWM over the whole run (nginx: its worker process$( (( WORKERS > 1 )) && echo "es, summed"))."
echo
echo "| proxy | listen backlog | connect mean | connect max | request mean | request max | req/s | failed | non-2xx | listen overflows | peak RSS MiB |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
declare -A SUM
for t in strangler nginx; do
  summary "$t"
  SUM[$t]="$S_CMAX $S_RMAX $S_RPS $S_FAILED $S_NON2XX $S_OVER $S_OVER_MAX"
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$t" "${BACKLOG[$t]}" \
    "$S_CMEAN" "$S_CMAX" "$S_RMEAN" "$S_RMAX" "$S_RPS" "$S_FAILED" "$S_NON2XX" "$S_OVER" \
    "$(python3 -c "print(f'{$S_RSS / 1024:.1f}')")"
done

read -r s_cmax s_rmax s_rps s_failed s_non2xx s_over s_over_max <<< "${SUM[strangler]}"
read -r n_cmax n_rmax n_rps _ <<< "${SUM[nginx]}"
verdict() { if python3 -c "import sys; sys.exit(0 if $1 else 1)"; then echo "met"; else echo "NOT met"; fi; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}' if $2 else '-')"; }
echo
echo "Targets (strangler):"
echo "- zero failed requests in every round: $(verdict "$s_failed == 0") ($s_failed failed, $s_non2xx non-2xx)"
echo "- zero listen overflows in every round: $(verdict "$s_over == 0") ($s_over in all, worst round $s_over_max)"
echo "- connect max within 1.5x nginx's: $(verdict "$s_cmax <= 1.5 * $n_cmax") ($s_cmax ms vs $n_cmax ms: $(ratio "$s_cmax" "$n_cmax")x)"
echo "- request max within 1.5x nginx's: $(verdict "$s_rmax <= 1.5 * $n_rmax") ($s_rmax ms vs $n_rmax ms: $(ratio "$s_rmax" "$n_rmax")x)"
echo "- req/s at least nginx's: $(verdict "$s_rps >= $n_rps") ($s_rps vs $n_rps: $(ratio "$s_rps" "$n_rps")x)"
if (( SMOKE )); then
  if (( s_failed > 0 || s_non2xx > 0 )); then
    echo "smoke run: FAILED: strangler had $s_failed failed requests and $s_non2xx non-2xx answers" >&2
    tail -n 20 "$WORK/strangler.log" >&2 || true
    exit 1
  fi
  echo "smoke run: strangler answered every request with a 2xx"
fi
