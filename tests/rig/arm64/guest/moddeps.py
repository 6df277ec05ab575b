#!/usr/bin/env python3
"""The guest modules and their dependencies, from modules.dep, dependencies first.

  moddeps.py MODULES_LIST MODULES_DEP     one path per line (relative to lib/modules/<kver>,
                                          e.g. kernel/drivers/virtio/virtio_mmio.ko), each after
                                          every module it needs

MODULES_LIST names modules as paths under kernel/ without ".ko" (guest/modules); a listed
module missing from modules.dep is built into the kernel and skipped.
"""
import sys


def main():
    wanted = []
    with open(sys.argv[1], encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                wanted.append(f"kernel/{line}.ko")
    deps = {}
    with open(sys.argv[2], encoding="utf-8") as f:
        for line in f:
            mod, _, rest = line.partition(":")
            # Compressed modules (.ko.xz) are named by their uncompressed path here.
            deps[mod.removesuffix(".xz")] = [d.removesuffix(".xz") for d in rest.split()]
    order, seen = [], set()

    def visit(mod):
        if mod in seen:
            return
        seen.add(mod)
        for dep in deps[mod]:
            visit(dep)
        order.append(mod)

    for mod in wanted:
        if mod in deps:
            visit(mod)
    print("\n".join(order))


if __name__ == "__main__":
    main()
