#!/usr/bin/env bash
# CI entry for the x86 real-guest rig: stock Debian guests (QEMU TCG) and user-mode Linux
# against our vhost-user backends, with qemu-storage-daemon and QEMU's built-in devices as the
# controls. Every test script runs, and any failure fails CI: a script that cannot run is a
# failure, not a skip. The benchmarks (blk-bench.sh, and net-tests.sh's table) run here in a
# short form, one round of short jobs, so that they keep working: they print figures and assert
# none (docs/performance.md quotes their full runs).
set -euo pipefail
cd "$(dirname "$0")/../../.."
tests/rig/x86/setup.sh --uml
export RIG_SKIP_SETUP=1
tests/rig/x86/blk-tests.sh --backend ours --num-queues 2
tests/rig/x86/blk-tests.sh --backend qsd --num-queues 2
tests/rig/x86/uml-blk-smoke.sh --backend qsd
tests/rig/x86/uml-blk-tests.sh
tests/rig/x86/uml-console-tests.sh
tests/rig/x86/uml-net-tests.sh
tests/rig/x86/net-tests.sh
tests/rig/x86/blk-bench.sh --rounds 1 --runtime 1
