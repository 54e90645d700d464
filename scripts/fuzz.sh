#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20), one after the other,
# starting from the committed seeds in fuzz/seeds/<target>/. libFuzzer keeps what it finds
# interesting in fuzz/corpus/<target>/ (not committed), so later runs start further on.
# Prints one line per target and exits non-zero on a finding, naming the input that
# triggers it. Needs a nightly toolchain; without one it says so and exits 0.
# See docs/FUZZING.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

seconds=${1:-20}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS per target, default 20]" >&2
    exit 64
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "skipped: no nightly toolchain"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet || exit 1
fi

# The fuzz crate builds (with sanitizers) in its own fuzz/target; a CARGO_TARGET_DIR meant
# for the workspace's stable builds must not mix the two.
unset CARGO_TARGET_DIR
logs=fuzz/target/logs
mkdir -p "$logs"

started=$SECONDS
if ! cargo +nightly fuzz build >"$logs/build.log" 2>&1; then
    tail -n 30 "$logs/build.log"
    echo "fuzz: the fuzz targets do not build (log: $logs/build.log)"
    exit 1
fi
echo "fuzz: targets built in $((SECONDS - started)) s"

# -timeout: an input that takes this long is reported as a hang (decoders must be fast).
# -rss_limit_mb (also the limit for a single allocation): a decoder must not let a few
# bytes make it allocate without bound.
failed=0
for target in $(cargo +nightly fuzz list); do
    mkdir -p "fuzz/corpus/$target"
    log="$logs/$target.log"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    status=$?
    runs=$(awk '/^stat::number_of_executed_units:/ {print $NF}' "$log" | tail -n 1)
    if [ "$status" = 0 ]; then
        result=ok
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        if [ -n "$artifact" ]; then
            result="FINDING: $artifact (reproduce: cargo +nightly fuzz run $target $artifact; log: $log)"
        else
            result="FAILED with status $status (log: $log)"
        fi
    fi
    printf '%-14s %10s runs  %s\n' "$target" "${runs:-?}" "$result"
done

if [ "$failed" != 0 ]; then
    echo "fuzz: findings above; see docs/FUZZING.md for what to do with them"
    exit 1
fi
echo "fuzz: no findings in ${seconds} s per target ($((SECONDS - started)) s in all)"
