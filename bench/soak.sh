#!/usr/bin/env bash
# strangler soak: a fixed request rate for a long time with shadowing on, a reload every
# RELOAD_EVERY seconds and a guard trip and reset every GUARD_EVERY seconds. Not run in CI.
#
#   bench/soak.sh                     30 minutes at 200 requests/s
#   DURATION=300 RATE=400 bench/soak.sh
#
# Reports, and fails (exit 1) when one does not hold:
#   - failed requests: 0 (h2load's failed + errored + timeout, and any non-2xx answer)
#   - RSS growth after warm-up: at most 10% (from the sample at WARMUP s to the last one)
#   - open file descriptors and runtime tasks back to their idle baseline once the load stops
#     (idle upstream connections are closed by the backends' 5 s keep-alive timeout first)
#   - every reload applied (the generation counts them) and every guard trip seen and reset
#
# Backends are nginx on loopback: `legacy`; `users`, which answers 503 while the file
# $WORK/users-fail exists (that is how the guard is tripped); `workouts`, the shadow.
# Routes: /api/users -> users with a guard and a fallback to legacy (clients never see the
# trip: a 5xx of an idempotent request is answered by legacy); /api/workouts -> legacy, shadowed
# to workouts; /api/feed -> legacy with a canary to workouts whose percent each reload flips.
# Installs nginx and h2load from Debian's packages when missing. Samples go to $WORK/samples.csv
# (kept with KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-1800}; RATE=${RATE:-200}; CONNS=${CONNS:-8}
RELOAD_EVERY=${RELOAD_EVERY:-10}; GUARD_EVERY=${GUARD_EVERY:-180}; WARMUP=${WARMUP:-120}
(( WARMUP < DURATION )) || WARMUP=$(( DURATION / 4 ))

source bench/lib.sh
install_missing "nginx h2load" "nginx nghttp2-client"

cargo build --release -q --bin strangler
BIN=target/release/strangler

work_dir
chmod 755 "$WORK"   # nginx workers (www-data) stat the flag file in it

BACKEND=$(free_port); USERS=$(free_port); WORKOUTS=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)

BODY='{"id":7,"name":"ada","plan":"pro","workouts":[{"id":1,"kind":"run","km":5.2},{"id":2,"kind":"swim","km":1.0}]}'
mkdir -p "$WORK/backend"
# Three servers on three ports: legacy, users (503 while the flag file exists), workouts.
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 5s;
  default_type application/json;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 '$BODY'; } }
  server {
    listen 127.0.0.1:$USERS;
    location / { if (-f $WORK/users-fail) { return 503 '{"error":"down"}'; } return 200 '$BODY'; }
  }
  server { listen 127.0.0.1:$WORKOUTS; location / { return 200 '$BODY'; } }
}
CONF

routes() { # $1: canary percent of /api/feed
  cat <<CONF
# soak generation input; canary percent $1
[server]
listen = "127.0.0.1:$PROXY"
admin = "127.0.0.1:$ADMIN"
workers = 1
access_log = false

[backends.legacy]
url = "http://127.0.0.1:$BACKEND"
legacy = true
[backends.users]
url = "http://127.0.0.1:$USERS"
[backends.workouts]
url = "http://127.0.0.1:$WORKOUTS"

[[routes]]
prefix = "/api/users"
backend = "users"
fallback = "legacy"
[routes.guard]
max_error_rate = 0.2
window = "10s"
min_requests = 20

[[routes]]
prefix = "/api/workouts"
backend = "legacy"
shadow = "workouts"

[[routes]]
prefix = "/api/feed"
backend = "legacy"
canary = { backend = "workouts", percent = $1, sticky = "header:x-user-id" }

[[routes]]
prefix = "/"
backend = "legacy"
CONF
}
routes 10 > "$WORK/routes.toml"

"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
RUST_LOG=warn "$BIN" run --config "$WORK/routes.toml" --log-format json 2>"$WORK/strangler.log" & SPID=$!; PIDS+=($SPID)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PROXY/api/users/7" -o /dev/null && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$PROXY/api/users/7" -o /dev/null || { echo "strangler did not come up" >&2; cat "$WORK/strangler.log" >&2; exit 1; }

admin() { curl -fs "http://127.0.0.1:$ADMIN$1"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$SPID/status"; }
fds() { ls "/proc/$SPID/fd" | wc -l; }
tasks() { admin /metrics | awk '$1 == "strangler_runtime_alive_tasks" {print $2}'; }
generation() { admin /routes | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'; }
tripped() { admin /routes | python3 -c 'import json,sys; r=[x for x in json.load(sys.stdin)["routes"] if x["prefix"]=="/api/users"][0]; print(str(r["guard_tripped"]).lower())'; }

# Idle baseline: the proxy has served its first requests and holds no client connection.
sleep 6
BASE_FDS=$(fds); BASE_TASKS=$(tasks); START_RSS=$(rss_kib)
echo "idle baseline: $BASE_FDS fds, $BASE_TASKS tasks, RSS $START_RSS KiB"

PER_CONN=$(( (RATE + CONNS - 1) / CONNS ))
echo "soak: ${DURATION}s at $(( PER_CONN * CONNS )) requests/s over $CONNS connections; a reload every ${RELOAD_EVERY}s, a guard trip and reset every ${GUARD_EVERY}s"
h2load --h1 -c "$CONNS" --rps "$PER_CONN" -D "$DURATION" -H 'x-user-id: 42' \
  "http://127.0.0.1:$PROXY/api/users/7" "http://127.0.0.1:$PROXY/api/workouts/1" \
  "http://127.0.0.1:$PROXY/api/feed" "http://127.0.0.1:$PROXY/api/users/7/workouts" \
  > "$WORK/h2load.txt" 2>&1 & LOAD=$!

echo "t_s,rss_kib,fds,tasks,generation" > "$WORK/samples.csv"
begin=$SECONDS; reloads=0; trips=0; next_guard=$GUARD_EVERY; WARM_RSS=""
while kill -0 "$LOAD" 2>/dev/null; do
  sleep "$RELOAD_EVERY"
  kill -0 "$LOAD" 2>/dev/null || break
  t=$(( SECONDS - begin ))
  reloads=$(( reloads + 1 ))
  routes $(( reloads % 2 == 0 ? 10 : 20 )) > "$WORK/routes.toml.tmp" && mv "$WORK/routes.toml.tmp" "$WORK/routes.toml"
  if (( t >= next_guard )); then
    next_guard=$(( next_guard + GUARD_EVERY ))
    touch "$WORK/users-fail"
    for _ in $(seq 300); do [[ $(tripped) == true ]] && break; sleep 0.1; done
    [[ $(tripped) == true ]] || { echo "guard did not trip at ${t}s" >&2; exit 1; }
    rm -f "$WORK/users-fail"
    curl -fs -X POST "http://127.0.0.1:$ADMIN/guard/reset?route=/api/users" -o /dev/null
    [[ $(tripped) == false ]] || { echo "guard did not reset at ${t}s" >&2; exit 1; }
    trips=$(( trips + 1 ))
  fi
  sample="$t,$(rss_kib),$(fds),$(tasks),$(generation)"
  echo "$sample" >> "$WORK/samples.csv"
  if [[ -z $WARM_RSS ]] && (( t >= WARMUP )); then WARM_RSS=$(rss_kib); fi
  (( t % 60 < RELOAD_EVERY )) && echo "  ${t}s: rss/fds/tasks/generation = ${sample#*,}"
done
wait "$LOAD" || true
END_RSS=$(rss_kib)
GEN=$(generation)

# Back to idle: the backends close idle upstream connections after 5 s.
for _ in $(seq 30); do
  (( $(fds) <= BASE_FDS && $(tasks) <= BASE_TASKS )) && break
  sleep 1
done
END_FDS=$(fds); END_TASKS=$(tasks)

grep -E "^(finished in|requests:|status codes:)" "$WORK/h2load.txt" | sed 's/^/  h2load: /'
read -r total started completed succeeded failed errored timeout < <(awk '/^requests:/ {print $2, $4, $6, $8, $10, $12, $14}' "$WORK/h2load.txt")
non2xx=$(awk '/^status codes:/ {gsub(",", ""); print $5 + $7 + $9}' "$WORK/h2load.txt")
bad=$(( failed + errored + timeout + non2xx ))
growth=$(python3 -c "print(f'{($END_RSS - ${WARM_RSS:-$END_RSS}) * 100 / ${WARM_RSS:-$END_RSS}:.1f}')")
echo "result: $completed requests, $bad failed; RSS $START_RSS KiB idle, ${WARM_RSS:-?} KiB after ${WARMUP}s, $END_RSS KiB at the end (${growth}% after warm-up); fds $BASE_FDS -> $END_FDS, tasks $BASE_TASKS -> $END_TASKS idle; $reloads reloads (generation $GEN), $trips guard trips and resets"
ok=1
(( bad == 0 )) || { echo "FAIL: $bad failed requests"; ok=0; }
python3 -c "import sys; sys.exit(0 if $growth <= 10 else 1)" || { echo "FAIL: RSS grew ${growth}% after warm-up"; ok=0; }
(( END_FDS <= BASE_FDS )) || { echo "FAIL: $END_FDS fds at the end, $BASE_FDS idle before"; ok=0; }
(( END_TASKS <= BASE_TASKS )) || { echo "FAIL: $END_TASKS tasks at the end, $BASE_TASKS idle before"; ok=0; }
(( GEN >= reloads + 1 )) || { echo "FAIL: generation $GEN after $reloads reloads"; ok=0; }
(( ok )) && echo "soak passed"
(( ok ))
