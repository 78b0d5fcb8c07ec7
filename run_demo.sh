#!/usr/bin/env bash
# Copyright 2026 The blip2_ros Authors
# Licensed under the Apache License, Version 2.0.
#
# Run the demo: a synthetic factory camera and the caption node on localhost-only DDS, captions
# printed next to the truth. Sets up .venv if needed. `./run_demo.sh --help` lists the options.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$("$ROOT/scripts/setup_env.sh")"
# No cd: relative paths the user passes (--model ./mine, --work-dir out) mean their own folder.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m blip2_ros.demo "$@"
