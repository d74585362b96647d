#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ on the stable toolchain (cargo-afl builds its own AFL++
# from the crate's bundled source; no nightly, no LLVM plugins needed).
#
#   fuzz/run.sh [SECONDS] [TARGET...]   each target (default: all four) for SECONDS (default 60)
#
# Seeds are fuzz/corpus/TARGET/. A crashing or hanging input is copied to
# fuzz/regressions/TARGET/ (commit it: `cargo test` replays it from then on) and the script
# exits 1. Installs cargo-afl if missing. Runs one target at a time (AFL++ takes one core).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}; shift || true
TARGETS=("$@"); [[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(config compare headers proxy)
AFL_VERSION=0.18.2

if ! cargo afl --version >/dev/null 2>&1; then
  echo "installing cargo-afl $AFL_VERSION..." >&2
  cargo install cargo-afl --version "$AFL_VERSION" --locked -q
fi
# AFL++ itself is built once per rustc version; the install may have done it already.
if ! compgen -G "${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs/rustc-$(rustc -V | awk '{print $2}')-*/afl.rs-*/afl/bin/afl-fuzz" >/dev/null; then
  cargo afl config --build --force
fi

# Instrumented builds get their own target directory, so they never invalidate the normal one.
export CARGO_TARGET_DIR=target/afl
cargo afl build --release -q -p strangler-fuzz --features afl --bins

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
found=0
for t in "${TARGETS[@]}"; do
  out=$(mktemp -d)
  echo "== fuzzing $t for ${SECONDS_EACH}s"
  # -t: a 5 s limit per input (the proxy target's own bound is 5 s too).
  cargo afl fuzz -i "fuzz/corpus/$t" -o "$out" -V "$SECONDS_EACH" -t 6000 \
    "$CARGO_TARGET_DIR/release/$t" </dev/null >"$out/afl.log" 2>&1 || {
    echo "afl-fuzz failed for $t:"; tail -n 30 "$out/afl.log"; exit 2; }
  stats="$out/default/fuzzer_stats"
  grep -E '^(execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs|bitmap_cvg) ' "$stats" | tr -s ' ' | sed 's/^/   /'
  for kind in crashes hangs; do
    for f in "$out/default/$kind"/id:*; do
      [[ -e $f ]] || continue
      mkdir -p "fuzz/regressions/$t"
      name="$kind-$(sha256sum "$f" | cut -c1-16)"
      cp "$f" "fuzz/regressions/$t/$name"
      echo "   $kind: fuzz/regressions/$t/$name"
      found=1
    done
  done
  rm -rf "$out"
done
if (( found )); then
  echo "AFL++ found crashing or hanging inputs (saved under fuzz/regressions/; cargo test -p strangler-fuzz replays them)"
  exit 1
fi
echo "no crash and no hang"
