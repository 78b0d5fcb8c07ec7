#!/usr/bin/env bash
# Copyright 2026 The blip2_ros Authors
# Licensed under the Apache License, Version 2.0.
#
# Run the whole test suite: sets up .venv if needed, then pytest (extra arguments go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$("$ROOT/scripts/setup_env.sh")"
cd "$ROOT"
# Idle OpenMP threads otherwise spin and slow every other process of the suite on a small CPU.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
