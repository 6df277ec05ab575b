#!/usr/bin/env bash
# Installs the third-party vhost-user backends that the interop tests and benchmarks drive,
# into build/thirdparty/bin. Idempotent: a crate whose binary is already there at the listed
# version is skipped. CI caches build/thirdparty (binaries and the cargo target directory).
#
# Usage: tests/thirdparty/install.sh            # everything in CRATES
#        tests/thirdparty/install.sh CRATE...   # only these
set -euo pipefail
cd "$(dirname "$0")/../.."

# One crate per line: name version.
CRATES="
vhost-device-console 0.1.0
vhost-device-rng 0.1.0
vhost-device-scsi 0.1.0
vhost-device-vsock 0.3.0
virtiofsd 1.14.0
"

# Debian packages a crate's build links against.
debian_packages() {
    case "$1" in
    virtiofsd) echo libseccomp-dev libcap-ng-dev ;;
    esac
}

install_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}"
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ROOT="$PWD/build/thirdparty"
export CARGO_TARGET_DIR="$ROOT/target"

wanted() {
    [ "$#" -eq 1 ] && return 0
    local name
    for name in "${@:2}"; do [ "$name" = "$1" ] && return 0; done
    return 1
}

for entry in $(printf '%s' "$CRATES" | tr ' ' '@'); do
    crate="${entry%@*}"
    version="${entry#*@}"
    wanted "$crate" "$@" || continue
    # cargo's install record names every installed crate with its version.
    if [ -x "$ROOT/bin/$crate" ] && grep -qs "\"$crate $version " "$ROOT/.crates.toml"; then
        echo "$crate $version: already installed in $ROOT/bin"
        continue
    fi
    # shellcheck disable=SC2046 # the package list is meant to split into words
    install_debian_packages $(debian_packages "$crate")
    echo "$crate $version: installing into $ROOT/bin"
    started=$SECONDS
    cargo install --locked --quiet "$crate" --version "=$version" --root "$ROOT"
    echo "$crate $version: installed in $((SECONDS - started)) s"
done
