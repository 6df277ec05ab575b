#!/usr/bin/env bash
# Checks that the workspace's declared `rust-version` covers what Cargo.lock needs: no locked
# package (dependencies of every target and platform) may declare a newer `rust-version`.
# Cheap: reads `cargo metadata`, builds nothing and installs no other toolchain. Whether our
# own code compiles with that version is not checked here; only the dependencies' floor is.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo metadata --format-version 1 --locked | python3 -c '
import json, sys

def parse(v):
    # "1.89" and "1.89.0" are the same version.
    parts = [int(x) for x in v.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))

def show(v):
    return ".".join(str(x) for x in (v[:2] if v[2] == 0 else v))

meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
declared = {parse(p["rust_version"]) for p in meta["packages"] if p["id"] in members}
if len(declared) != 1:
    sys.exit(f"workspace members declare different rust-versions: {sorted(map(show, declared))}")
declared = declared.pop()
needs = [(parse(p["rust_version"]), p["name"], p["version"])
         for p in meta["packages"] if p["id"] not in members and p.get("rust_version")]
need, name, version = max(needs)
if need > declared:
    sys.exit(f"rust-version is {show(declared)}, but Cargo.lock has {name} {version}, "
             f"which needs {show(need)}: raise workspace.package.rust-version")
print(f"rust-version {show(declared)} covers Cargo.lock (newest need: {name} {version}, {show(need)})")
'
