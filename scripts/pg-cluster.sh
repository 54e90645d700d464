#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback for the end-to-end suite's PostgreSQL run
# (scripts/test.sh sets HERALD_TEST_DATABASE_URL to what this prints).
#
#   scripts/pg-cluster.sh         starts the cluster (or finds the one already running)
#                                 and prints its URL: postgres://postgres@127.0.0.1:PORT/postgres
#   scripts/pg-cluster.sh stop    stops it and removes its directory
#
# It uses Debian's server binaries (/usr/lib/postgresql/VERSION/bin, the newest version
# installed; PG_BIN overrides), a fresh temporary directory for the data, socket and log,
# and listens on 127.0.0.1 only, on a free port, with trust authentication: it is for
# tests on this machine, never for data anyone keeps. Run as root, the server runs as
# the `postgres` user (PostgreSQL refuses to run as root); otherwise as the caller.
#
# Where the running cluster's directory is recorded, so that `stop` finds it:
# PG_CLUSTER_STATE, by default $TMPDIR/herald-pg-cluster.state.
set -euo pipefail

state=${PG_CLUSTER_STATE:-${TMPDIR:-/tmp}/herald-pg-cluster.state}
# Each test server opens 3-4 connections and the suite runs ~40 servers at once.
max_connections=400

die() {
    echo "pg-cluster: $*" >&2
    exit 1
}

bin_dir() {
    if [ -n "${PG_BIN:-}" ]; then
        [ -x "$PG_BIN/postgres" ] || die "PG_BIN=$PG_BIN holds no postgres binary"
        echo "$PG_BIN"
        return
    fi
    local dirs
    dirs=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sort -V) ||
        die "no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)"
    dirname "$(tail -n 1 <<<"$dirs")"
}

# Runs a PostgreSQL program as the user the server runs as.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

running_dir() {
    [ -f "$state" ] || return 1
    local dir
    dir=$(cat "$state")
    [ -d "$dir/data" ] && [ -f "$dir/port" ] && accepts "$dir" || return 1
    echo "$dir"
}

# Whether the cluster in $1 accepts connections. Asked over TCP rather than with
# `pg_ctl status`, which takes a killed server that nobody reaped (a zombie, in a
# container whose first process reaps nothing) for a running one.
accepts() {
    [ -f "$1/port" ] && "$(bin_dir)/pg_isready" -q -h 127.0.0.1 -p "$(cat "$1/port")" -t 5
}

url_of() {
    echo "postgres://postgres@127.0.0.1:$(cat "$1/port")/postgres"
}

# Whether something already accepts connections on 127.0.0.1:$1.
port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

stop() {
    if [ ! -f "$state" ]; then
        echo "pg-cluster: no cluster recorded in $state; nothing to stop" >&2
        return 0
    fi
    local dir
    dir=$(cat "$state")
    case "$dir" in
    */herald-pg.*) ;;
    *) die "$state names '$dir', which this script did not make; remove it by hand" ;;
    esac
    if [ -d "$dir/data" ]; then
        # Fast: open connections (a test server left running) are ended, not waited for.
        if ! as_owner "$(bin_dir)/pg_ctl" stop -D "$dir/data" -m fast -w -t 30 >/dev/null 2>&1 &&
            accepts "$dir"; then
            die "could not stop the cluster in $dir (log: $dir/log)"
        fi
    fi
    rm -rf "$dir"
    rm -f "$state"
    echo "pg-cluster: stopped and removed $dir" >&2
}

start() {
    local dir
    if dir=$(running_dir); then
        url_of "$dir"
        return 0
    fi
    # A recorded cluster that is not running (the machine restarted, or it was killed):
    # clear it and make a new one.
    [ -f "$state" ] && stop
    local bin
    bin=$(bin_dir)
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 ||
            die "no 'postgres' user to run the server as (the postgresql package makes it)"
    fi

    dir=$(mktemp -d "${TMPDIR:-/tmp}/herald-pg.XXXXXX")
    echo "$dir" >"$state"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    as_owner test -w "$dir" ||
        die "$dir is not writable by the server's user (set TMPDIR to a directory it can reach)"

    as_owner "$bin/initdb" -D "$dir/data" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
        die "initdb failed (log: $dir/initdb.log): $(tail -n 5 "$dir/initdb.log")"
    # Loopback TCP and this directory's socket only, no password (trust).
    as_owner sh -c "cat >'$dir/data/pg_hba.conf'" <<EOF
local all all trust
host all all 127.0.0.1/32 trust
EOF

    local port attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        port=$((20000 + RANDOM % 30000))
        port_taken "$port" && continue
        as_owner sh -c "cat >'$dir/data/postgresql.auto.conf'" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = $max_connections
EOF
        if as_owner "$bin/pg_ctl" start -D "$dir/data" -l "$dir/log" -w -t 60 >/dev/null 2>&1; then
            echo "$port" >"$dir/port"
            url_of "$dir"
            return 0
        fi
        # Another process took the port between the probe and the bind: try another.
        grep -q "could not bind\|Address already in use" "$dir/log" 2>/dev/null || break
    done
    local log
    log=$(tail -n 5 "$dir/log" 2>/dev/null || true)
    stop 2>/dev/null || true
    die "the server did not start after $attempt attempt(s): $log"
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
*) die "unknown argument '$1' (use: $0 [start|stop])" ;;
esac
