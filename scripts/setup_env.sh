#!/usr/bin/env bash
# Copyright 2026 The blip2_ros Authors
# Licensed under the Apache License, Version 2.0.
#
# Create or update .venv with everything the demo and the tests need: ROS 2 Kilted from PyPI
# wheels (rclpy, message packages), torch, transformers and the training tools, and the vLLM
# server's own environment in .venv/vllm (BLIP2_ROS_NO_VLLM=1 leaves that out). Safe to run
# again: each environment is reinstalled only when its requirements files changed. Source it or
# run it; it prints the venv path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLIP2_ROS_VENV:-$ROOT/.venv}"

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON="$candidate"; break
    fi
  done
fi
if [ -z "$PYTHON" ]; then
  echo "error: Python 3.11 is needed (the ROS 2 wheels on PyPI are built for CPython 3.11);" \
       "install it (e.g. with pyenv or your distribution) or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
# A venv made while python3.11-venv was missing (Debian, Ubuntu) has no pip; repair it.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "$VENV has no pip; adding it" >&2
  if ! "$VENV/bin/python" -m ensurepip --upgrade >/dev/null 2>&1; then
    # Only our own .venv is deleted and made again; a folder named by BLIP2_ROS_VENV is left.
    [ "$VENV" = "$ROOT/.venv" ] && rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1 || \
       ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
      echo "error: $PYTHON cannot make a virtual environment with pip; install its venv" \
           "module (e.g. sudo apt-get install python3.11-venv) and run this again" >&2
      exit 1
    fi
  fi
  rm -f "$VENV/.requirements.sha256"
fi
STAMP="$VENV/.requirements.sha256"
# requirements-vllm.txt has its own stamp (scripts/setup_vllm_env.sh).
WANTED="$(cat "$ROOT"/requirements-jazzy.txt "$ROOT"/requirements-ml.txt "$ROOT"/requirements.txt |
          sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
  echo "installing Python packages into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  # A second environment for test/test_jazzy.py: ROS 2 Jazzy's rclpy with Ubuntu 24.04's numpy
  # and OpenCV, and everything else from this one, found after its own packages.
  rm -rf "$VENV/jazzy"
  "$PYTHON" -m venv "$VENV/jazzy"
  "$VENV/jazzy/bin/python" -m pip install --quiet -r "$ROOT/requirements-jazzy.txt"
  site_packages='import sysconfig; print(sysconfig.get_paths()["purelib"])'
  "$VENV/bin/python" -c "$site_packages" > \
    "$("$VENV/jazzy/bin/python" -c "$site_packages")/blip2_ros_main_environment.pth"
  echo "$WANTED" > "$STAMP"
fi

# ament_xmllint calls the xmllint program.
if ! command -v xmllint >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q libxml2-utils >/dev/null 2>&1 || \
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libxml2-utils >/dev/null 2>&1) || true
  fi
  command -v xmllint >/dev/null 2>&1 || \
    echo "warning: xmllint is missing (sudo apt-get install libxml2-utils); the xmllint test will fail" >&2
fi
if [ "${BLIP2_ROS_NO_VLLM:-0}" != 1 ]; then
  # A failed vLLM install leaves the rest usable; its tests then say what is missing.
  PYTHON="$PYTHON" "$ROOT/scripts/setup_vllm_env.sh" "$VENV/vllm" >&2 || \
    echo "warning: installing vLLM into $VENV/vllm failed; test/test_vllm_server.py will" \
         "fail (CI) or skip" >&2
fi
echo "$VENV"
