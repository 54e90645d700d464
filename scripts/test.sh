#!/usr/bin/env bash
# Installs what the tests need (when run as root on Debian) and runs every check:
# formatting, clippy, and the whole test suite, ending with a one-line summary.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # iproute2: network-namespace tests (IP change); procps: process inspection;
    # mosquitto: the peer column of the benchmark smoke test.
    need=()
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v pgrep >/dev/null 2>&1 || need+=(procps)
    [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
    # chromium, chromium-driver: the console tests drive a real headless browser.
    { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || need+=(chromium chromium-driver)
    # libnss3-tools (certutil): a console test makes Chromium trust a CA of its own.
    [ -x /usr/bin/certutil ] || need+=(libnss3-tools)
    # dbus-daemon: a private session bus for the desktop-notification tests.
    [ -x /usr/bin/dbus-daemon ] || need+=(dbus-daemon)
    # debootstrap, rpm: the package tests install the .deb into a minimal Debian root and
    # inspect the .rpm; systemd: systemd-analyze verifies the units.
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    command -v rpm >/dev/null 2>&1 || need+=(rpm)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    # postgresql: the end-to-end suite runs a second time with the server's data in
    # PostgreSQL (scripts/pg-cluster.sh starts a throwaway cluster on loopback).
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need+=(postgresql)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    # aiosmtpd: the SMTP receiver of the forwarding tests (for the python3 on PATH).
    python3 -c 'import aiosmtpd' 2>/dev/null || python3 -m pip install -q aiosmtpd >/dev/null
    # schemathesis: generates requests from the API's OpenAPI description and checks
    # that none gets a 5xx (tests/tests/api_description_holds.rs).
    command -v schemathesis >/dev/null 2>&1 || python3 -m pip install -q schemathesis >/dev/null
fi

set -e
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
set +e

# The sum of one count ("passed", "failed", "ignored") over cargo's "test result:" lines.
count() {
    awk -v what="$1" '/^test result:/ {for (i = 1; i <= NF; i++) if ($i ~ "^" what ";?$") s += $(i-1)} END {print s+0}' "$2"
}

log=$(mktemp)
# Runs a cargo test command (any variables before it with `env`), teeing to $log; sets
# run_status, run_passed, run_failed and run_skipped. Tests that return at once and say
# so in HERALD_TEST_SKIP_LOG (herald_tests::sqlite_only, postgres_only) count as
# skipped, not passed, and are listed under the first argument.
counted_run() {
    local title=$1 skips skipped
    shift
    skips=$(mktemp)
    env HERALD_TEST_SKIP_LOG="$skips" "$@" 2>&1 | tee "$log"
    run_status=${PIPESTATUS[0]}
    skipped=$(wc -l <"$skips")
    run_passed=$(($(count passed "$log") - skipped))
    run_failed=$(count failed "$log")
    run_skipped=$(($(count ignored "$log") + skipped))
    if [ "$skipped" -gt 0 ]; then
        echo "$title"
        sort "$skips" | sed 's/^/  /'
    fi
    rm -f "$skips"
}

counted_run "skipped on SQLite (they need PostgreSQL):" cargo test --workspace --no-fail-fast
status=$run_status passed=$run_passed failed=$run_failed ignored=$run_skipped

# The end-to-end suite again, each test server keeping its data in a PostgreSQL database
# of its own (tests/src/database.rs) on a throwaway cluster, when a server is installed.
if compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || [ -n "${PG_BIN:-}" ]; then
    echo
    echo "postgres run: the end-to-end suite with HERALD_TEST_DATABASE_URL"
    trap 'bash scripts/pg-cluster.sh stop' EXIT
    if pg_url=$(bash scripts/pg-cluster.sh); then
        counted_run "skipped on PostgreSQL (they open herald.db, or need SQLite):" \
            env HERALD_TEST_DATABASE_URL="$pg_url" cargo test -p herald-tests --no-fail-fast
        pg_status=$run_status pg_passed=$run_passed pg_failed=$run_failed pg_ignored=$run_skipped
    else
        # Counted as one failure, so the summary does not read as all green.
        echo "postgres run failed: the cluster did not start"
        pg_status=1 pg_passed=0 pg_failed=1 pg_ignored=0
    fi
    bash scripts/pg-cluster.sh stop
    trap - EXIT
    pg_line="postgres: $pg_passed passed, $pg_failed failed, $pg_ignored skipped"
    passed=$((passed + pg_passed))
    failed=$((failed + pg_failed))
    ignored=$((ignored + pg_ignored))
    [ "$status" = 0 ] && status=$pg_status
else
    pg_line="postgres run skipped: no PostgreSQL server"
fi
rm -f "$log"

# Fuzz smoke: every fuzz target for 20 s from its seeds (scripts/fuzz.sh says "skipped"
# without a nightly toolchain). Before the summary, which stays the last line.
echo
bash scripts/fuzz.sh 20
fuzz_status=$?

echo
echo "$pg_line"
echo "summary: $passed passed, $failed failed, $ignored skipped"
[ "$status" = 0 ] && status=$fuzz_status
exit "$status"
