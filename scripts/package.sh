#!/usr/bin/env bash
# Builds Herald's packages: herald-agent and herald-server as .deb (cargo-deb) and .rpm
# (cargo-generate-rpm), from the metadata in agent/Cargo.toml and server/Cargo.toml, and
# herald-agent-VERSION-ARCH.tar.gz (binary, unit, settings file, autostart entry and a
# README) for systems with neither dpkg nor rpm.
#
#   scripts/package.sh [--out DIR] [--profile PROFILE]
#
# --out: where the packages go (default target/packages under the cargo target dir).
# --profile: the cargo profile (default dist: LTO, stripped; see Cargo.toml). The tests
#   pass `dev` to exercise the same packaging path without the minutes LTO costs.
# cargo-deb and cargo-generate-rpm are installed with `cargo install --locked` when
# absent. Prints the path of every package made, one a line, last.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: scripts/package.sh [--out DIR] [--profile PROFILE]" >&2
    exit 64
}

out=""
profile=dist
while [ $# -gt 0 ]; do
    case "$1" in
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --profile) [ $# -ge 2 ] || usage; profile=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "package.sh: unknown argument $1" >&2; usage ;;
    esac
done

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
out=${out:-$target_dir/packages}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# cargo's directory for a profile: dev builds land in debug/.
case "$profile" in
dev) profile_dir=debug ;;
*) profile_dir=$profile ;;
esac

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "package.sh: installing $tool" >&2
        cargo install --locked --quiet "$tool"
    fi
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }
arch=$(uname -m)

cargo build --quiet --profile "$profile" -p herald-agent -p herald-server --bins

# dist binaries are stripped by the profile; others are stripped into the .deb, and
# compressed fast: they are for tests. Requires are left out of the rpm (--auto-req
# disabled): the binaries need only glibc, and rpm's dependency scan needs rpm-build.
deb_flags=(--strip)
rpm_flags=(--auto-req disabled)
if [ "$profile" != dist ]; then
    deb_flags+=(--fast)
    rpm_flags+=(--payload-compress gzip)
fi
made=()
for crate in herald-agent herald-server; do
    cargo deb --quiet --no-build "${deb_flags[@]}" --profile "$profile" -p "$crate" --output "$out" >/dev/null
    made+=("$(ls -t "$out/${crate}_${version}"_*.deb | head -n 1)")
    cargo generate-rpm --profile "$profile" -p "${crate#herald-}" -o "$out" "${rpm_flags[@]}"
    made+=("$(ls -t "$out/$crate-$version"-*.rpm | head -n 1)")
done

# The tarball: what install.sh (or a person) puts in place where there is no dpkg or rpm.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dir=$stage/herald-agent-$version-$arch
mkdir -p "$dir"
install -m 0755 "$target_dir/$profile_dir/herald-agent" "$dir/herald-agent"
# dist binaries are stripped already; others would carry their debug information.
if command -v strip >/dev/null 2>&1; then strip "$dir/herald-agent"; fi
install -m 0644 installers/systemd/herald-agent.service "$dir/"
install -m 0644 installers/etc/agent.toml "$dir/agent.toml"
install -m 0644 installers/xdg/herald-agent-session.desktop "$dir/"
install -m 0755 installers/debian/herald-agent/postinst "$dir/postinst"
install -m 0644 installers/tarball/README.md "$dir/README.md"
tarball=$out/herald-agent-$version-$arch.tar.gz
tar -C "$stage" --owner=0 --group=0 --sort=name -czf "$tarball" "herald-agent-$version-$arch"
made+=("$tarball")

printf '%s\n' "${made[@]}"
