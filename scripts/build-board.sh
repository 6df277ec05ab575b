#!/usr/bin/env bash
# Builds the board release: a tarball with static aarch64 binaries of the bridge and every
# backend (cargo profile `board`: LTO, stripped), their man pages and bash/zsh/fish completions,
# the sample systemd units and init script, example configs, LICENSE, the third-party licence
# notices and CHANGELOG.
#
# Uses the rig's cross toolchain (tests/rig/hvisor/toolchain.sh: Debian's rustc-web with the
# arm64 standard library, no rustup target needed; the first run downloads it, and installs
# the aarch64 C linker with apt when missing, which needs root) and its cross-build.sh. The
# man pages and completions come from the binaries' own clap definitions: a host build with
# the `docgen` feature writes them (see docgen/).
#
# Output: target/dist/hvisor-vhost-<version>-aarch64-linux.tar.gz (its path is printed on
# stdout; everything else goes to stderr), laid out as an installation
# prefix under one top directory (bin/, lib/systemd/system/, share/...). Install with e.g.
#   tar -C /usr/local --strip-components=1 -xzf hvisor-vhost-<version>-aarch64-linux.tar.gz
# Environment: RIG_BUILD (the toolchain and build caches, default build/rig-hvisor).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
RIG=$REPO/tests/rig/hvisor
export RIG_BUILD=${RIG_BUILD:-$REPO/build/rig-hvisor}
BINS="hvisor-vhost-bridge vhost-user-blk vhost-user-net vhost-user-console"
CRATES="hvisor-bridge vhost-user-blk vhost-user-net vhost-user-console"

log() { echo "[build-board] $*" >&2; }
die() {
    echo "[build-board] error: $*" >&2
    exit 1
}

"$RIG/toolchain.sh" >&2
version=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version/ { print $2; exit }' Cargo.toml)
[ -n "$version" ] || die "no workspace version in Cargo.toml"
name=hvisor-vhost-$version-aarch64-linux
dist=$REPO/target/dist
stage=$dist/$name
rm -rf "$stage" "$dist/$name.tar.gz"
mkdir -p "$stage/bin"

log "aarch64 binaries (profile board)"
CROSS_PROFILE=board CROSS_OUT=$stage/bin "$RIG/cross-build.sh" >&2

log "man pages and completions (host build with the docgen feature)"
features=""
pkgs=()
for c in $CRATES; do
    features="$features${features:+,}$c/docgen"
    pkgs+=(-p "$c")
done
host_target=$RIG_BUILD/target-host-docgen
docgen_log=$RIG_BUILD/logs/docgen-build.log
mkdir -p "$(dirname "$docgen_log")"
# shellcheck source=/dev/null
if ! (. "$RIG_BUILD/out/env.sh" && cargo build --locked --target-dir "$host_target" \
    "${pkgs[@]}" --features "$features" --bins) >"$docgen_log" 2>&1; then
    tail -n 40 "$docgen_log" >&2
    die "host docgen build failed (full log: $docgen_log)"
fi
for b in $BINS; do
    HVV_DOCGEN_DIR=$stage "$host_target/debug/$b"
    [ -s "$stage/share/man/man1/$b.1" ] || die "$b wrote no man page"
done

log "service files, examples, licence"
install -D -m 0644 -t "$stage/lib/systemd/system" configs/systemd/*.service
install -D -m 0755 configs/init.d/hvisor-vhost "$stage/share/hvisor-vhost/init.d/hvisor-vhost"
install -D -m 0644 -t "$stage/share/doc/hvisor-vhost/examples" configs/*.json
install -D -m 0644 -t "$stage/share/doc/hvisor-vhost" README.md CHANGELOG.md docs/configuration.md \
    docs/migrating-from-hvisor-tool.md
install -D -m 0644 LICENSE "$stage/LICENSE"
# The licences and notices of what the binaries link, from the sources the cross build used.
# shellcheck source=/dev/null
(. "$RIG_BUILD/out/env.sh" && scripts/check-licenses.py --notices "$stage/THIRD-PARTY-NOTICES") >&2

for b in $BINS; do
    what=$(file -b "$stage/bin/$b")
    case $what in
    *"ARM aarch64"*"statically linked"*) ;;
    *) die "$b is not a static aarch64 executable: $what" ;;
    esac
done
# Reproducible order and ownership: the tarball does not depend on who built it.
tar -C "$dist" --sort=name --owner=0 --group=0 --numeric-owner -czf "$dist/$name.tar.gz" "$name"
log "$dist/$name.tar.gz ($(du -h "$dist/$name.tar.gz" | cut -f1)):"
tar -tzvf "$dist/$name.tar.gz" >&2
# The one line on standard output: the tarball, for scripts (the rig's ci.sh).
echo "$dist/$name.tar.gz"
