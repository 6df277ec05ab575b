#!/usr/bin/env bash
# CI entry for the arm64 EL2 trap rig: a stock Debian arm64 guest whose virtio-mmio devices
# trap through an hvisor-like EL2 stub into the unchanged bridge binary. The last run is the
# third-party matrix (docs/devices.md): one boot, six devices, every backend third-party.
set -euo pipefail
cd "$(dirname "$0")/../../.."
tests/rig/arm64/setup.sh
tests/rig/arm64/run.sh --test all
tests/rig/arm64/run.sh --test blk,reset --backend qsd
tests/rig/arm64/run.sh --test blk,reset --smp 2
tests/rig/arm64/run.sh --test blk,reset --config tests/rig/arm64/virtio_cfg_shared.json
tests/rig/arm64/run.sh --test all --backend thirdparty --smp 2 --config tests/rig/arm64/virtio_cfg_thirdparty.json
