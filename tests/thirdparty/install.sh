#!/usr/bin/env bash
# Installs the third-party vhost-user backends that the interop tests and benchmarks drive,
# into build/thirdparty/bin. Idempotent: a crate whose binary is already there at the listed
# version is skipped. CI caches build/thirdparty (binaries and the cargo target directory).
#
# Usage: tests/thirdparty/install.sh            # everything in CRATES
#        tests/thirdparty/install.sh CRATE...   # only these (from CRATES or ON_REQUEST)
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

# Crates that build here but that no test drives yet: the rig's guest kernel lacks the driver,
# this machine lacks the host device, or the bridge lacks a message the backend needs (see the
# device table). Installed only when named, so a default run spends no CI time on them.
ON_REQUEST="
vhost-device-can 0.1.0
vhost-device-gpio 0.1.0
vhost-device-gpu 0.2.0
vhost-device-i2c 0.1.0
vhost-device-input 0.1.0
vhost-device-scmi 0.4.0
vhost-device-sound 0.3.0
vhost-device-spi 0.1.0
"

# Debian packages a crate's build links against.
debian_packages() {
    case "$1" in
    virtiofsd) echo libseccomp-dev libcap-ng-dev ;;
    # libgpiod-sys links libgpiod 2 (bookworm has 1.6 in main, 2.x in backports) and runs
    # bindgen, which loads libclang.
    vhost-device-gpio) echo libclang-dev libgpiod-dev/backports ;;
    esac
}

# Extra `cargo install` options. sound and gpu: their default features link host audio
# (ALSA, PipeWire, GStreamer) and 3D (virglrenderer, gfxstream) libraries; without them each
# keeps its null backend (`--backend null`, `--gpu-mode null`).
cargo_options() {
    case "$1" in
    vhost-device-sound | vhost-device-gpu) echo --no-default-features ;;
    esac
}

# A package written PKG/backports is taken from <codename>-backports where that suite has it
# (the release's own version is too old there), else from the release. It is always
# installed, so that an older version already present is upgraded; this only happens when
# the crate that needs it is built.
install_debian_packages() {
    local missing=() pkg i codename
    for pkg in "$@"; do
        case "$pkg" in
        */backports) ;;
        *) dpkg -s "$pkg" >/dev/null 2>&1 && continue ;;
        esac
        missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    # shellcheck disable=SC1091 # the host's release file
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    for i in "${!missing[@]}"; do
        case "${missing[i]}" in
        */backports)
            pkg=${missing[i]%/backports}
            apt-cache policy "$pkg" | grep -q -- " $codename-backports/" && pkg="$pkg/$codename-backports"
            missing[i]=$pkg
            ;;
        esac
    done
    echo "installing Debian packages: ${missing[*]}"
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

list=$CRATES
[ "$#" -gt 0 ] && list="$CRATES$ON_REQUEST"
for entry in $(printf '%s' "$list" | tr ' ' '@'); do
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
    # shellcheck disable=SC2046 # the option list is meant to split into words
    cargo install --locked --quiet "$crate" --version "=$version" --root "$ROOT" $(cargo_options "$crate")
    echo "$crate $version: installed in $((SECONDS - started)) s"
done
