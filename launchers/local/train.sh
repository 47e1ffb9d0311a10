#!/usr/bin/env bash
# Thin local launcher: one process, the config and overrides passed through to `ddrl train`.
# Usage: launchers/local/train.sh configs/demo_cpu.yaml [key=value ...]
set -euo pipefail
exec ddrl train "$@"
