#!/usr/bin/env python3
"""Checks every package in Cargo.lock against deny.toml's licence allow list.

The same policy as `cargo deny check licenses`, without installing cargo-deny: each locked
package's `license` (an SPDX expression; the old `A/B` spelling means `A OR B`) must be
satisfiable with allowed licences only, and the workspace's own crates must be Apache-2.0
with complete metadata (description, licence, repository, readme, rust-version).

With --notices FILE it also writes the third-party notices a binary release needs: for every
package the four shipped binaries link (normal dependencies, aarch64 Linux), its licence and
the text of the licence and notice files it ships.
"""
import json
import os
import re
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["hvisor-bridge", "vhost-user-blk", "vhost-user-net", "vhost-user-console"]
NOTICE_FILE = re.compile(r"^(licen[cs]e|copying|notice|copyright)", re.IGNORECASE)


def satisfiable(expr, allowed):
    """Whether the SPDX expression `expr` can be met with licences in `allowed`."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expr.replace("/", " OR "))
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def factor():
        if peek() == "(":
            take()
            value = disjunction()
            if take() != ")":
                raise ValueError(f"unbalanced parentheses in {expr!r}")
            return value
        name = take()
        if peek() == "WITH":
            take()
            take()  # an exception only widens what the licence permits
        return name in allowed

    def conjunction():
        value = factor()
        while peek() == "AND":
            take()
            value = factor() and value
        return value

    def disjunction():
        value = conjunction()
        while peek() == "OR":
            take()
            value = conjunction() or value
        return value

    value = disjunction()
    if pos != len(tokens):
        raise ValueError(f"cannot parse licence expression {expr!r}")
    return value


def metadata(*extra):
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", *extra],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


# What a workspace crate's manifest must say, for a registry or a distribution's packager.
REQUIRED_METADATA = ["description", "license", "repository", "readme", "rust_version"]


def check(meta, allowed):
    members = set(meta["workspace_members"])
    bad = []
    for p in meta["packages"]:
        lic = p.get("license")
        if p["id"] in members:
            if lic != "Apache-2.0":
                bad.append(f"{p['name']}: workspace crate licence {lic!r}, not Apache-2.0")
            missing = [k for k in REQUIRED_METADATA if not p.get(k)]
            if missing:
                bad.append(f"{p['name']}: manifest lacks {', '.join(missing)}")
        elif not lic:
            bad.append(f"{p['name']} {p['version']}: no licence expression")
        elif not satisfiable(lic, allowed):
            bad.append(f"{p['name']} {p['version']}: {lic} is not within {sorted(allowed)}")
    return bad


def notices(path):
    meta = metadata("--filter-platform", "aarch64-unknown-linux-gnu")
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    members = set(meta["workspace_members"])
    todo = [i for i in members if packages[i]["name"] in SHIPPED]
    linked = set()
    while todo:
        node = nodes[todo.pop()]
        for dep in node["deps"]:
            # Only what ends up in the binaries: not build scripts' or tests' dependencies.
            # Proc macros run in the compiler and are not linked either.
            if packages[dep["pkg"]]["targets"][0]["kind"] == ["proc-macro"]:
                continue
            if any(k["kind"] is None for k in dep["dep_kinds"]) and dep["pkg"] not in linked:
                linked.add(dep["pkg"])
                todo.append(dep["pkg"])
    with open(path, "w", encoding="utf-8") as out:
        out.write("Third-party software in the hvisor-vhost binaries\n")
        out.write("=" * 50 + "\n\n")
        chosen = sorted((packages[i] for i in linked - members), key=lambda p: (p["name"], p["version"]))
        for p in chosen:
            out.write(f"{p['name']} {p['version']}: {p['license']}\n")
        for p in chosen:
            out.write(f"\n\n{'=' * 78}\n{p['name']} {p['version']} ({p['license']})\n")
            if p.get("repository"):
                out.write(f"{p['repository']}\n")
            pkg_dir = os.path.dirname(p["manifest_path"])
            files = sorted(f for f in os.listdir(pkg_dir) if NOTICE_FILE.match(f)
                           and os.path.isfile(os.path.join(pkg_dir, f)))
            if not files:
                out.write("(the package ships no licence file; its licence is named above)\n")
            for f in files:
                out.write(f"\n--- {f} ---\n")
                with open(os.path.join(pkg_dir, f), encoding="utf-8", errors="replace") as text:
                    out.write(text.read())
    return len(linked - members)


def main():
    with open(os.path.join(ROOT, "deny.toml"), "rb") as f:
        allowed = set(tomllib.load(f)["licenses"]["allow"])
    meta = metadata()
    bad = check(meta, allowed)
    if bad:
        sys.exit("licence policy (deny.toml) violated:\n  " + "\n  ".join(bad))
    print(f"licences ok: {len(meta['packages'])} packages within {sorted(allowed)}")
    if len(sys.argv) == 3 and sys.argv[1] == "--notices":
        n = notices(sys.argv[2])
        print(f"notices for {n} linked packages written to {sys.argv[2]}")
    elif len(sys.argv) != 1:
        sys.exit("usage: check-licenses.py [--notices FILE]")


if __name__ == "__main__":
    main()
