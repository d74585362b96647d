#!/usr/bin/env bash
# strangler instruction-count benchmark: userspace instructions per request, counted by
# callgrind, for strangler (plain, shadowed, canary, auth (a cached token per algorithm: EdDSA, RS256, ES256, HS256), rate-limited, stale-if-error and 64 KiB routes), nginx as a
# reverse proxy (plain and 64 KiB) and the floor of strangler's stack (bench/minimal_proxy.rs:
# hyper 1.x + hyper-util's pooled client and nothing else), side by side in one run.
#
#   bench/icount.sh                  full run: every target, N=4000 requests each
#   bench/icount.sh --smoke          N=200, strangler plain only: checks the harness works
#   BIN=/path/to/strangler bench/icount.sh
#                                    count that binary (default: cargo build --release)
#   BUDGET=120000 bench/icount.sh --smoke
#                                    exit 1 when strangler plain costs more than BUDGET * 1.10
#                                    instructions per request (a CI gate)
#   N=4000 C=8 WARMUP=1000           requests measured, keep-alive connections, warm-up requests
#   PLAIN_ONLY=1 bench/icount.sh     strangler plain only, at the full N (a before/after check
#                                    of two builds: BIN=... PLAIN_ONLY=1 bench/icount.sh)
#   ONLY="strangler plain,nginx plain,hyper minimal" bench/icount.sh
#                                    these targets only (names as in the table)
#
# Method: each proxy runs under `valgrind --tool=callgrind --instr-atstart=no`, so nothing is
# counted until asked. For each target: WARMUP requests with instrumentation off (pools, caches
# and allocator warm), `callgrind_control -z` and `-i on`, `h2load --h1 -n N -c C` (keep-alive),
# one second of idle time with instrumentation still on (the shadow legs of the last requests run
# after the client's answer: their cost belongs to the figure; the script then checks that every
# shadow leg of the measured requests was finished inside that window, and extends it by a second
# at a time when not), `callgrind_control -i off` and `-d`. The dump's total Ir / N is the figure.
# Admin scrapes happen only while instrumentation is off. Callgrind counts every thread of the
# process (tokio's workers, blocking pool, the file watcher) and only userspace instructions: the
# kernel's share of a request (syscalls, loopback TCP) is not in it. The figure is stable to well
# under 1% between runs, whatever else the machine is doing.
#
# nginx is counted the same way, as one process: its config has `master_process off; daemon off;`,
# so the process valgrind starts is the one that accepts and proxies (no --trace-children needed).
# The backends (plain nginx, not under valgrind) answer a 1 KiB JSON body, and 64 KiB on /big.
#
# Installs valgrind, nginx and h2load (nghttp2-client) from Debian's packages when missing.
# Everything listens on 127.0.0.1. Writes no file in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
N=${N:-4000}; C=${C:-8}; WARMUP=${WARMUP:-1000}
if (( SMOKE )); then N=200; WARMUP=200; fi
BUDGET=${BUDGET:-}

source bench/lib.sh
install_missing "valgrind callgrind_control nginx h2load openssl" "valgrind nginx nghttp2-client openssl"

strangler_bin
MINIMAL=target/release/examples/minimal_proxy
(( SMOKE )) || cargo build --release -q --example minimal_proxy

work_dir
chmod 755 "$WORK"   # nginx workers (an unprivileged user) read the 64 KiB file in it
CG=$WORK/callgrind; mkdir -p "$CG"

BACKEND=$(free_port); SHADOWSVC=$(free_port); USERS=$(free_port)
STRANGLER=$(free_port); ADMIN=$(free_port); NGINX_PROXY=$(free_port); HYPER=$(free_port)

python3 - "$WORK/body.json" "$WORK/www/big" <<'PY'
import json, os, sys
def body(size):
    items = [{"id": i, "name": f"user{i}", "plan": "free"} for i in range(size // 50)]
    b = json.dumps({"users": items})
    return b + " " * (size - len(b) - 1) + "\n" if len(b) < size else b[:size - 1] + "\n"
open(sys.argv[1], "w").write(body(1024))
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
open(sys.argv[2], "w").write(body(65536))
PY
chmod -R a+rX "$WORK/www"

mkdir -p "$WORK/backend" "$WORK/proxy"
# Backends: legacy (1 KiB, and 64 KiB on /big), shadowsvc and users (the same 1 KiB body).
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000;
  default_type application/json;
  server {
    listen 127.0.0.1:$BACKEND;
    location = /big { root $WORK/www; }
    location / { return 200 '$(cat "$WORK/body.json")'; }
  }
  server { listen 127.0.0.1:$SHADOWSVC; location / { return 200 '$(cat "$WORK/body.json")'; } }
  server { listen 127.0.0.1:$USERS; location / { return 200 '$(cat "$WORK/body.json")'; } }
}
CONF
# nginx as the reverse proxy under test: one process (no master), the location of bench/lib.sh.
nginx_proxy_conf "master_process off;" 4096 "server 127.0.0.1:$BACKEND;" > "$WORK/proxy/nginx.conf"
# Bearer tokens for the /auth routes, one per algorithm: a key made here with openssl, its
# JWKS (or an HMAC secret file) and one token signed with it. The proxy caches a verified token,
# so each route measures the cache-hit path of its algorithm; bench/auth_cost.sh counts misses.
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
unhex() { python3 -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(sys.stdin.read().strip()))'; }
JWT_BODY=$(printf '{"iss":"https://issuer.bench/","aud":"bench","sub":"7","exp":%d}' $(( $(date +%s) + 86400 )) | b64url)
declare -A TOKEN
jwt_input() { # $1 alg: writes header.body to $WORK/jwt-$1.msg, prints it
  local head; head=$(printf '{"alg":"%s","kid":"bench","typ":"JWT"}' "$1" | b64url)
  printf '%s.%s' "$head" "$JWT_BODY" | tee "$WORK/jwt-$1.msg"
}
openssl genpkey -algorithm ed25519 -out "$WORK/ed.pem" 2>/dev/null
printf '{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","kid":"bench","x":"%s"}]}' \
  "$(openssl pkey -in "$WORK/ed.pem" -pubout -outform DER | tail -c 32 | b64url)" >"$WORK/jwks-eddsa.json"
TOKEN[/auth]="$(jwt_input EdDSA).$(openssl pkeyutl -sign -inkey "$WORK/ed.pem" -rawin -in "$WORK/jwt-EdDSA.msg" | b64url)"
openssl genpkey -algorithm rsa -pkeyopt rsa_keygen_bits:2048 -out "$WORK/rsa.pem" 2>/dev/null
printf '{"keys":[{"kty":"RSA","alg":"RS256","kid":"bench","e":"AQAB","n":"%s"}]}' \
  "$(openssl rsa -in "$WORK/rsa.pem" -noout -modulus 2>/dev/null | sed 's/^Modulus=//' | unhex | b64url)" >"$WORK/jwks-rs256.json"
TOKEN[/auth-rs256]="$(jwt_input RS256).$(openssl dgst -sha256 -sign "$WORK/rsa.pem" "$WORK/jwt-RS256.msg" | b64url)"
openssl genpkey -algorithm ec -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/ec.pem" 2>/dev/null
EC_POINT=$(openssl pkey -in "$WORK/ec.pem" -pubout -outform DER | tail -c 64 | od -An -v -tx1 | tr -d ' \n')   # x || y
printf '{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"bench","x":"%s","y":"%s"}]}' \
  "$(unhex <<<"${EC_POINT:0:64}" | b64url)" "$(unhex <<<"${EC_POINT:64:64}" | b64url)" >"$WORK/jwks-es256.json"
# openssl writes an ECDSA signature as DER; a JWS carries r || s, 32 bytes each
TOKEN[/auth-es256]="$(jwt_input ES256).$(openssl dgst -sha256 -sign "$WORK/ec.pem" "$WORK/jwt-ES256.msg" | python3 -c '
import sys
d = sys.stdin.buffer.read(); i = 2
def integer():
    global i
    n = d[i + 1]; v = d[i + 2:i + 2 + n]; i += 2 + n
    return v.lstrip(b"\0").rjust(32, b"\0")
sys.stdout.buffer.write(integer() + integer())' | b64url)"
head -c 48 /dev/urandom | base64 -w0 >"$WORK/hs256.secret"
TOKEN[/auth-hs256]="$(jwt_input HS256).$(openssl dgst -sha256 -mac HMAC -macopt "key:$(cat "$WORK/hs256.secret")" -binary "$WORK/jwt-HS256.msg" | b64url)"

cat > "$WORK/routes.toml" <<CONF
[server]
listen = "127.0.0.1:$STRANGLER"
admin = "127.0.0.1:$ADMIN"
workers = 1
access_log = false
[backends.legacy]
url = "http://127.0.0.1:$BACKEND"
legacy = true
[backends.shadowsvc]
url = "http://127.0.0.1:$SHADOWSVC"
[backends.users]
url = "http://127.0.0.1:$USERS"
[[routes]]
prefix = "/plain"
backend = "legacy"
[[routes]]
prefix = "/shadow"
backend = "legacy"
shadow = "shadowsvc"
[[routes]]
prefix = "/canary"
backend = "legacy"
canary = { backend = "users", percent = 50, sticky = "header:x-user-id" }
[[routes]]
prefix = "/big"
backend = "legacy"
$(for alg in EdDSA RS256 ES256 HS256; do
  lower=$(tr A-Z a-z <<<"$alg")
  key="jwks_file = \"jwks-$lower.json\""
  [[ $alg == HS256 ]] && key="secret_file = \"hs256.secret\""
  prefix="/auth-$lower"; [[ $alg == EdDSA ]] && prefix="/auth"
  printf '[auth.%s]\nissuer = "https://issuer.bench/"\naudiences = ["bench"]\nalgorithms = ["%s"]\n%s\nclaims_to_headers = { "x-user-id" = "sub" }\n' "$lower" "$alg" "$key"
  printf '[[routes]]\nprefix = "%s"\nbackend = "legacy"\nauth = "%s"\n' "$prefix" "$lower"
done)
[[routes]]
prefix = "/limited"
backend = "legacy"
rate_limit = { limit = 1000000, per = "1s", key = "ip" }
[[routes]]
prefix = "/stale"
backend = "legacy"
stale_if_error = { max_stale = "1h" }
CONF

# h2load sends one header set on every request, so a sticky canary puts all of them on one side.
# Pick a user id in the canary (answered by `users`); every target gets the same header.
USER_ID=""
for id in $(seq 1 100); do
  if "$BIN" explain --config "$WORK/routes.toml" GET /canary -H "x-user-id: $id" 2>/dev/null | grep -q -- '-> in the canary'; then
    USER_ID=$id; break
  fi
done
[[ -n $USER_ID ]] || { echo "no user id in 1..100 lands in the canary" >&2; exit 1; }

"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" & PIDS+=($!)
CALLGRIND=(nice -n 10 valgrind --tool=callgrind --instr-atstart=no --vgdb=yes)
RUST_LOG=warn "${CALLGRIND[@]}" --callgrind-out-file="$CG/strangler.%p" \
  "$BIN" run --config "$WORK/routes.toml" --log-format json 2>"$WORK/strangler.log" & STRANGLER_PID=$!; PIDS+=($STRANGLER_PID)
PORTS="$BACKEND $SHADOWSVC $USERS $STRANGLER"
if (( ! SMOKE )) && [[ ${PLAIN_ONLY:-0} != 1 ]]; then
  "${CALLGRIND[@]}" --callgrind-out-file="$CG/nginx.%p" \
    "$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" 2>"$WORK/nginx-proxy.log" & NGINX_PID=$!; PIDS+=($NGINX_PID)
  # The floor of the stack: hyper 1.x + hyper-util's pooled client and nothing else.
  "${CALLGRIND[@]}" --callgrind-out-file="$CG/hyper.%p" \
    "$MINIMAL" "127.0.0.1:$HYPER" "127.0.0.1:$BACKEND" 2>"$WORK/hyper-minimal.log" & HYPER_PID=$!; PIDS+=($HYPER_PID)
  PORTS+=" $NGINX_PROXY $HYPER"
fi
# valgrind's start is slow (it reads the binary's debug info): allow a minute.
for port in $PORTS; do
  for _ in $(seq 600); do curl -fs "http://127.0.0.1:$port/plain" -o /dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/plain" -o /dev/null || {
    echo "target on port $port did not come up" >&2; cat "$WORK"/*.log "$WORK"/*/error.log >&2 || true; exit 1; }
done

# h2load; fails unless every request got a 2xx.
load() { # $1 port, $2 path, $3 requests
  local out extra=()
  [[ -n ${TOKEN[$2]:-} ]] && extra=(-H "authorization: Bearer ${TOKEN[$2]}")
  out=$(h2load --h1 -n "$3" -c "$C" -H "x-user-id: $USER_ID" "${extra[@]}" "http://127.0.0.1:$1$2" 2>&1) || { echo "$out" >&2; return 1; }
  grep -Eq "^requests: $3 total, $3 started, $3 done, $3 succeeded, 0 failed, 0 errored" <<<"$out" &&
    grep -Eq "^status codes: $3 2xx" <<<"$out" || { echo "h2load on $2: not every request succeeded" >&2; echo "$out" >&2; return 1; }
}
cg() { callgrind_control "$@" >>"$WORK/callgrind_control.log" 2>&1; }
shadow_total() { curl -fs "http://127.0.0.1:$ADMIN/metrics" | awk '/^strangler_shadow_total\{/ {s += $NF} END {printf "%d\n", s}'; }
shadow_outcomes() { curl -fs "http://127.0.0.1:$ADMIN/metrics" | grep '^strangler_shadow_total{' | sed -E 's/.*outcome="([^"]+)".* ([0-9.e+]+)$/\1=\2/' | tr '\n' ' '; }
# Ir of a dump file: its "totals:" line (or "summary:" where a version writes only that).
dump_ir() { awk '$1 == "totals:" {t = $2} $1 == "summary:" && t == "" {s = $2} END {print (t != "" ? t : s)}' "$1"; }

declare -A IR PER
measure() { # $1 target name, $2 pid under callgrind, $3 port, $4 path, $5 dump prefix
  local target=$1 pid=$2 port=$3 path=$4 prefix=$5 shadow_before="" extra=0 before after dump
  [[ $target == "strangler shadow" ]] && shadow_before=$(shadow_total)
  load "$port" "$path" "$WARMUP"
  sleep 1   # the warm-up's connections are closed before counting starts
  if [[ -n $shadow_before ]]; then
    # and the warm-up's shadow legs are finished (counting is off: this scraping is not counted)
    for _ in $(seq 100); do (( $(shadow_total) - shadow_before >= WARMUP )) && break; sleep 0.1; done
    (( $(shadow_total) - shadow_before >= WARMUP )) || { echo "warm-up shadow legs unfinished" >&2; exit 1; }
    shadow_before=$(shadow_total)
  fi
  before=$(ls "$CG" | grep -c "^$prefix\." || true)
  cg -z "$pid"; cg -i on "$pid"
  load "$port" "$path" "$N"
  sleep 1
  cg -i off "$pid"
  if [[ -n $shadow_before ]]; then
    # every measured request's shadow leg must have finished while counting was on
    while (( $(shadow_total) - shadow_before < N )); do
      (( extra++ < 10 )) || { echo "shadow legs still unfinished after 11 s" >&2; exit 1; }
      cg -i on "$pid"; sleep 1; cg -i off "$pid"
    done
    echo "  shadow outcomes since start: $(shadow_outcomes)(counting window extended by ${extra} s)" >&2
  fi
  cg -d "$pid"
  for _ in $(seq 100); do
    after=$(ls "$CG" | grep -c "^$prefix\." || true)
    (( after > before )) && break; sleep 0.1
  done
  dump=$(ls -t "$CG"/"$prefix".* | head -1)
  IR[$target]=$(dump_ir "$dump")
  [[ -n ${IR[$target]} && ${IR[$target]} -gt 0 ]] || { echo "no Ir total in $dump" >&2; exit 1; }
  PER[$target]=$(( IR[$target] / N ))
  printf '%-18s %14d Ir  %10d Ir/request\n' "$target" "${IR[$target]}" "${PER[$target]}" >&2
}

START=$SECONDS
echo "callgrind: N=$N requests per target over $C keep-alive connections, $WARMUP warm-up requests; x-user-id: $USER_ID" >&2
ALL=("strangler plain" "nginx plain" "hyper minimal" "strangler 64 KiB" "nginx 64 KiB" "strangler shadow" "strangler canary" "strangler auth" "strangler auth RS256" "strangler auth ES256" "strangler auth HS256" "strangler ratelimit" "strangler stale")
if (( SMOKE )) || [[ ${PLAIN_ONLY:-0} == 1 ]]; then
  ONLY="strangler plain"
fi
TARGETS=()
for t in "${ALL[@]}"; do
  [[ -z ${ONLY:-} || ",$ONLY," == *",$t,"* ]] && TARGETS+=("$t")
done
(( ${#TARGETS[@]} )) || { echo "ONLY=$ONLY names no target (one of: ${ALL[*]})" >&2; exit 1; }
# Each target's process, port, path and dump prefix; they are counted in MEASURE_ORDER (the
# strangler routes first, then nginx, then the floor).
declare -A WHERE=(
  ["strangler plain"]="$STRANGLER_PID $STRANGLER /plain strangler"
  ["strangler shadow"]="$STRANGLER_PID $STRANGLER /shadow strangler"
  ["strangler canary"]="$STRANGLER_PID $STRANGLER /canary strangler"
  ["strangler auth"]="$STRANGLER_PID $STRANGLER /auth strangler"
  ["strangler auth RS256"]="$STRANGLER_PID $STRANGLER /auth-rs256 strangler"
  ["strangler auth ES256"]="$STRANGLER_PID $STRANGLER /auth-es256 strangler"
  ["strangler auth HS256"]="$STRANGLER_PID $STRANGLER /auth-hs256 strangler"
  ["strangler ratelimit"]="$STRANGLER_PID $STRANGLER /limited strangler"
  ["strangler stale"]="$STRANGLER_PID $STRANGLER /stale strangler"
  ["strangler 64 KiB"]="$STRANGLER_PID $STRANGLER /big strangler"
  ["nginx plain"]="${NGINX_PID:-} $NGINX_PROXY /plain nginx"
  ["nginx 64 KiB"]="${NGINX_PID:-} $NGINX_PROXY /big nginx"
  ["hyper minimal"]="${HYPER_PID:-} $HYPER /plain hyper"
)
MEASURE_ORDER=("strangler plain" "strangler shadow" "strangler canary" "strangler auth" "strangler auth RS256" "strangler auth ES256" "strangler auth HS256" "strangler ratelimit" "strangler stale" "strangler 64 KiB" "nginx plain" "nginx 64 KiB" "hyper minimal")
for t in "${MEASURE_ORDER[@]}"; do
  [[ " ${TARGETS[*]} " == *" $t "* ]] || continue
  # shellcheck disable=SC2086
  measure "$t" ${WHERE[$t]}
done

for log in "$WORK/proxy/error.log" "$WORK/backend/error.log"; do
  [[ -s $log ]] && { echo "warnings in $log (figures may be off):" >&2; tail -5 "$log" >&2; }
done

ratio() { # $1 / $2 to two places, or "-" when a target was not counted this run
  if [[ -n $1 && -n $2 ]]; then python3 -c "print(f'{$1 / $2:.2f}')"; else echo "-"; fi
}
echo
echo "| target | instructions per request | ratio |"
echo "|---|---:|---|"
for t in "${TARGETS[@]}"; do
  case $t in
    "strangler plain") r="$(ratio "${PER[$t]}" "${PER[nginx plain]:-}") × nginx plain" ;;
    "hyper minimal") r="$(ratio "${PER[$t]}" "${PER[nginx plain]:-}") × nginx plain; strangler plain is $(ratio "${PER[strangler plain]:-}" "${PER[$t]}") × it" ;;
    "strangler 64 KiB") r="$(ratio "${PER[$t]}" "${PER[nginx 64 KiB]:-}") × nginx 64 KiB" ;;
    "strangler shadow"|"strangler canary"|"strangler auth"*|"strangler ratelimit"|"strangler stale") r="$(ratio "${PER[$t]}" "${PER[strangler plain]:-}") × strangler plain" ;;
    nginx*) r="1.00 (reference)" ;;
  esac
  printf '| %s | %d | %s |\n' "$t" "${PER[$t]}" "$r"
done
echo
echo "Ir totals (N=$N requests each, plus connection set-up and tear-down of $C connections):"
for t in "${TARGETS[@]}"; do printf -- '- %s: %d\n' "$t" "${IR[$t]}"; done
echo
echo "binary: $BIN; valgrind $(valgrind --version | sed 's/valgrind-//'); nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'); took $(( SECONDS - START )) s of measuring"

if [[ -n $BUDGET ]]; then
  if python3 -c "import sys; sys.exit(0 if ${PER[strangler plain]} <= $BUDGET * 1.10 else 1)"; then
    echo "budget: strangler plain ${PER[strangler plain]} <= $BUDGET * 1.10: OK"
  else
    echo "budget: strangler plain ${PER[strangler plain]} > $BUDGET * 1.10: FAIL" >&2
    exit 1
  fi
fi
(( SMOKE )) && echo "smoke run: harness OK"
exit 0
