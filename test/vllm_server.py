# Copyright 2026 The blip2_ros Authors
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""
A vLLM server on a tiny BLIP-2, one per test session, started by scripts/serve_vllm.py.

The ``vllm_server`` fixture (conftest.py makes it visible to every test file) builds a tiny
checkpoint that vLLM's CPU attention can run, serves it on a free port of 127.0.0.1 from the
vLLM environment (``.venv/vllm`` beside the test run's venv, or BLIP2_ROS_VLLM_PYTHON) and
stops it at the end of the session. Without that environment the tests that use it skip, and
fail under CI, which must run them.
"""

import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from blip2_ros.demo.isolation import parent_death_signal
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE_SCRIPT = ROOT / 'scripts' / 'serve_vllm.py'
VLLM_PYTHON = Path(os.environ.get('BLIP2_ROS_VLLM_PYTHON')
                   or Path(sys.prefix) / 'vllm' / 'bin' / 'python')
# Healthy after ~40 s on 2 busy cores with --enforce-eager; torch.compile would add ~60 s.
START_TIMEOUT = 180
STOP_TIMEOUT = 30
LOG_TAIL_LINES = 40
# The session's server wants this key, so the tests see what a wrong or missing key does; they
# pass it the way users do, through the environment variable api_key_env names.
API_KEY = 'blip2-ros-test-key'
API_KEY_ENV = 'BLIP2_ROS_TEST_API_KEY'
SERVER_ENVIRONMENT = {'VLLM_NO_USAGE_STATS': '1', 'DO_NOT_TRACK': '1', 'HF_HUB_OFFLINE': '1'}


def require_vllm_python():
    """Return the vLLM environment's python; skip the test without one (fail under CI)."""
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    message = (f'no vLLM environment at {VLLM_PYTHON}: run scripts/setup_env.sh without '
               'BLIP2_ROS_NO_VLLM=1, or set BLIP2_ROS_VLLM_PYTHON to a python with vllm')
    if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def serve_command(model, *options):
    """Return the command line and environment that run scripts/serve_vllm.py on ``model``."""
    environment = dict(os.environ, BLIP2_ROS_VLLM_PYTHON=str(require_vllm_python()),
                       **SERVER_ENVIRONMENT)
    return [sys.executable, str(SERVE_SCRIPT), str(model), *options], environment


def build_servable_checkpoint(folder):
    """
    Save a tiny BLIP-2 that vLLM serves on a CPU and whose captions depend on the image.

    Head size 32 (hidden 64, 2 heads) is one vLLM's CPU attention implements; the wider
    random weights make different frames get different captions.
    """
    from training.tiny_blip2 import build_tiny_blip2
    return build_tiny_blip2(folder, language_model='opt', seed=0, hidden_size=64, num_heads=2,
                            image_init_std=0.2, text_init_std=0.5)


def free_port():
    """Return a TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class VllmServer:
    """A vLLM server process on 127.0.0.1 serving one checkpoint; restartable on its port."""

    def __init__(self, checkpoint, model_name, log_path, extra_args=('--enforce-eager',)):
        """Pick a free port; ``start()`` runs the server."""
        self.checkpoint = Path(checkpoint)
        self.model_name = model_name
        self.log_path = Path(log_path)
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.process = None

    @property
    def base_url(self):
        """Return the OpenAI API root that clients are given, e.g. http://127.0.0.1:PORT/v1."""
        return f'http://127.0.0.1:{self.port}/v1'

    def start(self, timeout=START_TIMEOUT):
        """Start the server and wait until GET /health answers; raise AssertionError if not."""
        if self.process is not None and self.process.poll() is None:
            return
        command, environment = serve_command(
            self.checkpoint, '--port', str(self.port), '--served-model-name', self.model_name,
            *self.extra_args)
        with open(self.log_path, 'ab') as log:
            log.write(f'--- {" ".join(command)}\n'.encode())
            # A session of its own: stop() ends the server and its engine processes together.
            # If the test run itself dies (a crash, kill -9), the server gets SIGTERM and stops.
            self.process = subprocess.Popen(command, env=environment, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True,
                                            preexec_fn=parent_death_signal())
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise AssertionError(f'the vLLM server exited with {self.process.returncode} '
                                     f'before it was healthy:\n{self.log_tail()}')
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f'the vLLM server was not healthy after {timeout} s:\n'
                                     f'{self.log_tail()}')
            time.sleep(0.5)

    def stop(self):
        """Stop the server and every process it started; the port is free again afterwards."""
        if self.process is None:
            return
        process, self.process = self.process, None
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        # Engine processes that outlive the server would keep memory and a core.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def log_tail(self, lines=LOG_TAIL_LINES):
        """Return the last lines of the server's log."""
        text = self.log_path.read_text(encoding='utf-8', errors='replace')
        return '\n'.join(text.splitlines()[-lines:])

    def _healthy(self):
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.port}/health', timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False


def build_lora_training_output(base, folder, std=0.2, seed=3, prompt=''):
    """
    Save a LoRA adapter on ``base`` as a ``training.train --method lora`` run leaves it.

    The adapter's B matrices are random (``std``) instead of zero, so it changes the captions.
    """
    import json

    from blip2_ros.captioner import TRAINING_INFO_FILE
    from peft import get_peft_model, LoraConfig
    import torch
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=r'.*language_model.*\.(q_proj|v_proj)'))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if 'lora_B' in name:  # zero at first: the adapter would change nothing
                parameter.normal_(0.0, std, generator=generator)
    peft_model.save_pretrained(folder)
    Path(folder, TRAINING_INFO_FILE).write_text(json.dumps(
        {'prompt': prompt, 'method': 'lora', 'base_model': str(base)}))
    return Path(folder)


@pytest.fixture(scope='session')
def vllm_server(tmp_path_factory):
    """
    Serve a tiny BLIP-2 with vLLM for the whole test session: a LoRA training output, merged.

    Yields a :class:`VllmServer`: ``base_url`` (http://127.0.0.1:PORT/v1), ``model_name``,
    ``checkpoint`` (the merged folder it serves, for the local captioner to compare with),
    ``base_checkpoint`` and ``adapter`` (what the training run started from and saved),
    ``stop()`` and ``start()`` (the same port again). A test that stops the server must start
    it again.
    """
    from training.export_merged import main as export_merged

    require_vllm_python()
    folder = tmp_path_factory.mktemp('vllm-server')
    base = build_servable_checkpoint(folder / 'tiny-blip2-opt')
    adapter = build_lora_training_output(base, folder / 'lora-run')
    merged = folder / 'lora-merged'
    assert export_merged(['--adapter', str(adapter), '--output', str(merged)]) == 0
    server = VllmServer(merged, 'tiny-blip2', folder / 'server.log',
                        extra_args=('--enforce-eager', '--api-key', API_KEY))
    server.base_checkpoint, server.adapter = Path(base), adapter
    try:
        server.start()
        yield server
    finally:
        server.stop()
