#!/usr/bin/env bash
# Thin local launcher: one process, the config and overrides passed through to `ddrl train`.
# Usage: launchers/local/train.sh configs/demo_cpu.yaml [key=value ...]
set -euo pipefail
# exec: Ctrl-C and SIGTERM reach `ddrl train` itself, which checkpoints after the step in progress
# and exits 130 / 143 (rerun the same command to resume)
exec ddrl train "$@"
