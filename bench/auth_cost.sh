#!/usr/bin/env bash
# Instructions per request of a route's `auth` phase, per algorithm: a verified-token cache
# miss (signature and claims checked, then cached) and a cache hit, counted with callgrind on
# the real phase (bench/auth_cost.rs). Only instructions inside its `authenticate_all` are
# collected (callgrind --toggle-collect): key generation and token signing, whose cost varies
# between runs, are not. The figure is that total divided by the requests.
#
#   bench/auth_cost.sh                    # all algorithms, MISS=50 and HIT=500 requests
#   MISS=20 HIT=200 bench/auth_cost.sh
#
# Compare with bench/icount.sh's "strangler plain" and "strangler auth" rows: the whole
# proxied request, with and without a (cached) token check.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
install_missing "valgrind" "valgrind"
MISS=${MISS:-50}
HIT=${HIT:-500}
cargo build --release --example auth_cost -q
BIN=target/release/examples/auth_cost
ir() { # alg mode n -> instructions inside authenticate_all
  valgrind --tool=callgrind --callgrind-out-file=/dev/null --collect-atstart=no \
    --toggle-collect='auth_cost::authenticate_all*' "$BIN" "$1" "$2" "$3" 2>&1 >/dev/null |
    sed -nE 's/.*Collected : ([0-9]+).*/\1/p'
}
# Wall clock, natively (valgrind hides the CPU's SHA extensions, so the cache hit's SHA-256
# is counted in software above; natively it uses them where the CPU has them).
wall() { "$BIN" "$1" "$2" "$3" | sed -nE 's/.*, (.*) each.*/\1/p'; }
echo "| algorithm | cache miss (Ir/request) | cache hit (Ir/request) | miss, wall clock | hit, wall clock |"
echo "|---|---:|---:|---:|---:|"
for alg in RS256 ES256 EdDSA HS256; do
  row="| $alg"
  for mode in miss hit; do
    n=$([[ $mode == miss ]] && echo "$MISS" || echo "$HIT")
    total=$(ir "$alg" "$mode" "$n")
    [[ -n $total && $total -gt 0 ]] || { echo "callgrind counted nothing for $alg $mode" >&2; exit 1; }
    row+=" | $(( total / n ))"
  done
  row+=" | $(wall "$alg" miss 2000) | $(wall "$alg" hit 100000)"
  echo "$row |"
done
echo
echo "MISS=$MISS HIT=$HIT requests; valgrind $(valgrind --version | sed 's/valgrind-//'); $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
