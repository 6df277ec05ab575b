#!/usr/bin/env bash
# Checks the sample service files: `systemd-analyze verify` on the systemd units (syntax,
# directives, dependencies, executables) and shellcheck plus `sh -n` on the init script.
# The units name the board's install paths (/usr/local/bin): the check points them at stub
# executables of the same names, since the binaries are not installed on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v systemd-analyze >/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/bin" "$tmp/units"
    for unit in configs/systemd/*.service; do
        grep -ho '/usr/local/bin/[^ ]*' "$unit" | while read -r exe; do
            printf '#!/bin/sh\n' >"$tmp/bin/${exe##*/}"
            chmod +x "$tmp/bin/${exe##*/}"
        done
        sed "s|/usr/local/bin/|$tmp/bin/|g" "$unit" >"$tmp/units/${unit##*/}"
    done
    units=()
    for unit in "$tmp"/units/*.service; do
        case $unit in
        *@.service) units+=("${unit%@.service}@1.service") ;; # a template: check one instance
        *) units+=("$unit") ;;
        esac
    done
    # Warnings count as failures: verify prints them but exits 0 for some.
    out=$(cd "$tmp/units" && systemd-analyze verify --man=no "${units[@]}" 2>&1) || {
        echo "$out" >&2
        exit 1
    }
    if [ -n "$out" ]; then
        echo "$out" >&2
        exit 1
    fi
    echo "systemd units verified: $(cd configs/systemd && echo *.service)"
else
    echo "systemd-analyze not available: units not verified"
fi
sh -n configs/init.d/hvisor-vhost
if command -v shellcheck >/dev/null; then shellcheck configs/init.d/hvisor-vhost; fi
echo "init script checked"
