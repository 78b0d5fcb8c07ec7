#!/usr/bin/env bash
# Copyright 2026 The blip2_ros Authors
# Licensed under the Apache License, Version 2.0.
#
# Run the whole test suite: sets up .venv if needed, then pytest (extra arguments go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$("$ROOT/scripts/setup_env.sh")"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
