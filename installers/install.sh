#!/bin/sh
# Herald's one-line installer for herald-agent. herald-server serves it at /install.sh
# with its own URL and certificate pin filled in below; `herald-server token create
# --install-command` and the console's "Link a device" page print the command:
#
#   curl -fsSk --pinnedpubkey 'sha256//PIN' https://SERVER:PORT/install.sh \
#     | sudo sh -s -- TOKEN deb=SHA256 rpm=SHA256 tar=SHA256
#
# What it does, as root: picks the package format (dpkg: deb, rpm: rpm, else the
# tarball) and the platform (linux-$(uname -m)); finds that package in the server's list
# of operator-signed herald-agent releases; downloads it over the same pinned connection;
# refuses it unless its SHA-256 is the one the command carries for that format; installs
# it (dpkg -i, rpm -i, or the tarball into /usr/local with the systemd unit); enrolls
# with TOKEN and starts the service where systemd runs. On any failure it removes what it
# installed and exits non-zero with one sentence saying why. See docs/PACKAGES.md,
# "One-line install".
#
# Run by hand from a file: HERALD_URL=https://SERVER:PORT HERALD_PIN='sha256//PIN'
# sh install.sh TOKEN deb=SHA256 ...
set -eu
set -f

# Filled in by the server as it serves this file (the URL the script was fetched from,
# and the SPKI pin of the certificate it presents there).
baked_url=''
baked_pin=''

PACKAGE=herald-agent
STATE=/var/lib/herald-agent
TAR_BIN=/usr/local/bin/herald-agent
TAR_UNIT=/etc/systemd/system/herald-agent.service
TAR_AUTOSTART=/etc/xdg/autostart/herald-agent-session.desktop
TAR_CONFIG=/etc/herald/agent.toml

say() { printf 'herald-install: %s\n' "$*"; }

work=''
installed=''
tar_files=''
tar_config=''

# Puts back what this run installed: the package (purged, with the state its
# post-install step may have made) or the tarball's files.
undo() {
    case "$installed" in
    deb) dpkg --purge "$PACKAGE" >/dev/null 2>&1 || true ;;
    rpm) rpm -e "$PACKAGE" >/dev/null 2>&1 || true ;;
    tar)
        if [ -d /run/systemd/system ]; then
            systemctl disable --now herald-agent.service >/dev/null 2>&1 || true
        fi
        for f in $tar_files; do rm -f "$f"; done
        [ -z "$tar_config" ] || rm -f "$tar_config"
        rm -rf "$STATE"
        if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
        ;;
    esac
    [ -z "$installed" ] || say "removed the $installed package this run had installed"
    installed=''
}

fail() {
    printf 'herald-install: %s\n' "$*" >&2
    undo
    exit 1
}

cleanup() {
    status=$?
    if [ "$status" -ne 0 ] && [ -n "$installed" ]; then undo; fi
    [ -z "$work" ] || rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# === arguments ===

usage="usage: sh install.sh TOKEN [deb=SHA256] [rpm=SHA256] [tar=SHA256]"
[ $# -ge 1 ] || fail "no enrollment token given; $usage"
token=$1
shift
case "$token" in
'' | *[!A-Za-z0-9_.=+/-]*) fail "the first argument is not an enrollment token; $usage" ;;
esac
want_deb=''
want_rpm=''
want_tar=''
for arg in "$@"; do
    hash=${arg#*=}
    case "$hash" in
    *[!0-9a-f]*) fail "$arg: a SHA-256 is 64 lower-case hex digits" ;;
    esac
    [ ${#hash} -eq 64 ] || fail "$arg: a SHA-256 is 64 lower-case hex digits"
    case "$arg" in
    deb=*) want_deb=$hash ;;
    rpm=*) want_rpm=$hash ;;
    tar=*) want_tar=$hash ;;
    *) fail "unknown argument $arg; $usage" ;;
    esac
done

url=${baked_url:-${HERALD_URL:-}}
pin=${baked_pin:-${HERALD_PIN:-}}
case "$url" in
https://*) ;;
*) fail "no server URL: fetch this script from the server's /install.sh, or set HERALD_URL=https://SERVER:PORT" ;;
esac
case "$pin" in
sha256//?*) ;;
*) fail "no certificate pin: fetch this script from the server's /install.sh, or set HERALD_PIN='sha256//...'" ;;
esac

# === where we are ===

[ "$(id -u)" -eq 0 ] || fail "run me as root: ... | sudo sh -s -- TOKEN ..."
[ "$(uname -s)" = Linux ] || fail "$(uname -s) is not supported: the one-line install is for Linux (see installers/README.md for macOS and Windows)"
platform="linux-$(uname -m)"
if command -v dpkg >/dev/null 2>&1; then
    format=deb
elif command -v rpm >/dev/null 2>&1; then
    format=rpm
else
    format=tar
fi
for tool in curl sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing: install it first"
done
[ "$format" != tar ] || command -v tar >/dev/null 2>&1 || fail "tar is missing: install it first"

case "$format" in
deb) want=$want_deb; if dpkg -s "$PACKAGE" >/dev/null 2>&1; then already=yes; else already=''; fi ;;
rpm) want=$want_rpm; if rpm -q "$PACKAGE" >/dev/null 2>&1; then already=yes; else already=''; fi ;;
tar) want=$want_tar; if [ -e "$TAR_BIN" ]; then already=yes; else already=''; fi ;;
esac
[ -z "$already" ] || fail "$PACKAGE is already installed here; upgrade it through Herald (package subscribe) or your package manager"
[ ! -e "$STATE/agent.toml" ] || fail "this machine is already enrolled ($STATE/agent.toml); remove that state first to enroll it again"
[ -n "$want" ] || fail "this machine takes a $format package, but the command carries no $format=SHA256: ask for a command made after a $format package was published"
say "this machine takes the $format package for $platform"

# === download and check ===

work=$(mktemp -d)
fetch() {
    curl -fsSk --proto =https --pinnedpubkey "$pin" --retry 2 -o "$2" "$url$1"
}
fetch /api/v1/install/agent "$work/list" || fail "cannot read the package list from $url (wrong pin, or the server is unreachable)"
line=$(awk -v f="$format" -v p="$platform" '$1 == f && $2 == p { print; exit }' "$work/list")
[ -n "$line" ] || fail "the server has no operator-signed $format package of $PACKAGE for $platform"
set -- $line
version=$3
listed=$4
[ "$listed" = "$want" ] || fail "the server offers $PACKAGE $version as $format with SHA-256 $listed, but this command expects $want: refusing it (for another platform, or republished since?)"
fetch "/api/v1/artifacts/$want" "$work/package" || fail "cannot download the $format package from $url"
got=$(sha256sum "$work/package" | cut -d ' ' -f 1)
[ "$got" = "$want" ] || fail "the downloaded package has SHA-256 $got, not $want as the command expects: refusing to install it; nothing was installed"
say "downloaded $PACKAGE $version ($format, $platform), SHA-256 $got as expected"

# === install and enroll ===

case "$format" in
deb)
    installed=deb
    HERALD_TOKEN=$token dpkg -i "$work/package" || fail "dpkg -i failed (see above); nothing is left installed"
    ;;
rpm)
    installed=rpm
    HERALD_TOKEN=$token rpm -i "$work/package" || fail "rpm -i failed (see above); nothing is left installed"
    # rpm keeps a package whose %post failed: enrollment is checked below.
    ;;
tar)
    mkdir "$work/unpacked"
    tar -xzf "$work/package" -C "$work/unpacked" || fail "the tarball does not unpack"
    dir=$(find "$work/unpacked" -mindepth 1 -maxdepth 1 -type d | head -n 1)
    [ -n "$dir" ] && [ -f "$dir/herald-agent" ] || fail "the tarball holds no herald-agent"
    installed=tar
    tar_files="$TAR_BIN $TAR_UNIT"
    install -d -m 0755 /usr/local/bin /etc/systemd/system /etc/herald
    install -m 0755 "$dir/herald-agent" "$TAR_BIN"
    sed "s#/usr/bin/herald-agent#$TAR_BIN#g" "$dir/herald-agent.service" > "$TAR_UNIT"
    chmod 0644 "$TAR_UNIT"
    if [ ! -e "$TAR_CONFIG" ]; then
        install -m 0644 "$dir/agent.toml" "$TAR_CONFIG"
        tar_config=$TAR_CONFIG
    fi
    if [ -d /etc/xdg/autostart ]; then
        sed "s#/usr/bin/herald-agent#$TAR_BIN#g" "$dir/herald-agent-session.desktop" > "$TAR_AUTOSTART"
        tar_files="$tar_files $TAR_AUTOSTART"
    fi
    install -d -m 0700 "$STATE"
    "$TAR_BIN" --state-dir "$STATE" enroll "$token" || fail "enrollment failed (see above); nothing is left installed"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable --now herald-agent.service || fail "herald-agent.service did not start"
    fi
    ;;
esac
[ -f "$STATE/agent.toml" ] || fail "$PACKAGE was installed but did not enroll (see above); nothing is left installed"
installed=''

say "installed $PACKAGE $version from $url"
say "enrolled: $STATE holds this machine's identity"
if [ -d /run/systemd/system ]; then
    say "started herald-agent.service (systemctl status herald-agent)"
else
    say "no systemd here: start the agent with: HERALD_STATE_DIR=$STATE herald-agent run"
fi
