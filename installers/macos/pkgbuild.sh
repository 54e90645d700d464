#!/bin/sh
# UNTESTED: written without a macOS machine or toolchain; check it on a Mac first.
#
# Builds herald-agent-VERSION.pkg for macOS from a herald-agent binary built on a Mac
# (cargo build --profile dist -p herald-agent). The package installs the binary in
# /usr/local/bin, the LaunchDaemon and the session helper's LaunchAgent; its postinstall
# enrolls when /etc/herald/enroll.token exists (then removes it) and loads the daemon.
#
#   installers/macos/pkgbuild.sh BINARY VERSION [OUT_DIR]
set -eu

[ $# -ge 2 ] || { echo "usage: $0 BINARY VERSION [OUT_DIR]" >&2; exit 64; }
binary=$1
version=$2
out=${3:-.}
here=$(cd "$(dirname "$0")" && pwd)
command -v pkgbuild >/dev/null 2>&1 || { echo "pkgbuild not found: run this on macOS" >&2; exit 1; }
[ -x "$binary" ] || { echo "$binary is not an executable" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/usr/local/bin" "$work/root/Library/LaunchDaemons" \
    "$work/root/Library/LaunchAgents" "$work/scripts"
install -m 0755 "$binary" "$work/root/usr/local/bin/herald-agent"
install -m 0644 "$here/com.herald.agent.plist" "$work/root/Library/LaunchDaemons/"
install -m 0644 "$here/com.herald.agent-session.plist" "$work/root/Library/LaunchAgents/"

cat > "$work/scripts/postinstall" <<'SCRIPT'
#!/bin/sh
# Runs as root after the files are in place. Same steps as the Linux packages' postinst.
STATE=/var/lib/herald-agent
TOKEN_FILE=/etc/herald/enroll.token
install -d -m 0700 "$STATE"
if [ -f "$TOKEN_FILE" ] && [ ! -f "$STATE/agent.toml" ]; then
    /usr/local/bin/herald-agent --state-dir "$STATE" enroll "$(tr -d ' \t\r\n' < "$TOKEN_FILE")" || exit 1
    rm -f "$TOKEN_FILE"
fi
if [ -f "$STATE/agent.toml" ]; then
    launchctl bootout system/com.herald.agent 2>/dev/null || true
    launchctl bootstrap system /Library/LaunchDaemons/com.herald.agent.plist
fi
exit 0
SCRIPT
chmod 0755 "$work/scripts/postinstall"

pkgbuild --root "$work/root" --scripts "$work/scripts" \
    --identifier com.herald.agent --version "$version" \
    --install-location / "$out/herald-agent-$version.pkg"
echo "$out/herald-agent-$version.pkg"
