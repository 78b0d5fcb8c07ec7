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
The OpenVINO backend: BLIP-2 with an OPT language model, converted once and run on the CPU.

The checkpoint is loaded and validated by :mod:`blip2_ros.checkpoint` exactly as for the local
backend, then converted with ``openvino.convert_model`` into two graphs: the image encoder
(vision tower, Q-Former and projection) and one step of the OPT decoder, whose KV cache goes in
and out as explicit tensors. A greedy loop in numpy drives the step, so the captions are the
ones the local backend's ``generate`` gives. The converted graphs are kept on disk, one folder
per checkpoint, adapter, OpenVINO version and weight mode; a changed weight file changes the
folder's name, so a stale conversion is never used. With ``openvino_weights`` 'int8' the
weights are compressed to 8 bits (nncf, asymmetric), which makes decoding faster still.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings

from blip2_ros.captioner import _check_settings, Blip2Captioner, CaptionerConfig
from blip2_ros.checkpoint import (
    load_checkpoint, locate_checkpoint, model_location, ModelLoadError, one_line,
    read_blip2_config)
from blip2_ros.decode import DecodeLoop
import numpy as np
import torch

LOGGER = logging.getLogger(__name__)

OPENVINO_WEIGHTS = ('fp32', 'int8')
# Part of every cache key: raise it whenever the converted graphs change meaning.
CONVERSION_FORMAT = 1
IMAGE_ENCODER_FILE = 'image_encoder.xml'
DECODER_STEP_FILE = 'decoder_step.xml'
# Where converted graphs are kept; under $XDG_CACHE_HOME (default ~/.cache).
CACHE_SUBFOLDER = os.path.join('blip2_ros', 'openvino')


def openvino_cache_folder():
    """Return the folder converted checkpoints are kept in (XDG_CACHE_HOME honoured)."""
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(home, CACHE_SUBFOLDER)


class ImageEncoder(torch.nn.Module):
    """Vision tower, Q-Former and projection: pixel values to the language model's queries."""

    def __init__(self, model):
        """Wrap a loaded Blip2ForConditionalGeneration."""
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        """Return the image queries, as generate() computes them."""
        # DecodeLoop's method reads only ``self.model``: one definition of the image path.
        return DecodeLoop._image_features(self, pixel_values)


class DecoderStep(torch.nn.Module):
    """
    One pass of the OPT language model with its KV cache as plain tensors in and out.

    ``prefix_embeds`` (the image queries; zero rows after the prefill) go before the
    embeddings of ``input_ids``. ``attention_mask`` is the additive 4-D mask (batch, 1, new,
    past + new) and ``position_ids`` are explicit, so nothing is derived from the cache inside
    the graph. Returns the last position's logits, then each layer's keys and values.
    """

    def __init__(self, model):
        """Wrap the language model of a loaded Blip2ForConditionalGeneration."""
        super().__init__()
        self.language_model = model.language_model
        self.text_config = model.config.text_config

    def forward(self, input_ids, prefix_embeds, attention_mask, position_ids, *past):
        """Run the new positions on top of ``past``; return logits and the grown cache."""
        from transformers import DynamicCache
        embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix_embeds, embeds], dim=1)
        cache = DynamicCache(config=self.text_config)
        for layer, keys, values in zip(cache.layers, past[0::2], past[1::2]):
            # Filled directly: update() would concatenate onto an empty tensor, which does not
            # convert.
            layer.keys, layer.values = keys, values
            layer.dtype, layer.device = keys.dtype, keys.device
            layer.is_initialized = True
        output = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, logits_to_keep=1)
        present = []
        for layer in output.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (output.logits[:, -1], *present)


def _file_stamps(folder):
    """Return (name, size, mtime) of every file in a folder, sorted; [] for no folder."""
    if not folder or not os.path.isdir(folder):
        return []
    stamps = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            status = os.stat(path)
            stamps.append((name, status.st_size, status.st_mtime_ns))
    return stamps


def _checkpoint_folder(config):
    """Return the folder whose files make up the checkpoint: the folder, or the hub snapshot."""
    location, kind = model_location(config.model)
    if kind == 'folder':
        return os.path.abspath(location)
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(config.model, 'config.json')
    return os.path.dirname(found) if isinstance(found, str) else ''


def cache_key(config, weights):
    """
    Return the name of the cache folder for a checkpoint, adapter and weight mode.

    It hashes every file's name, size and modification time in the checkpoint and adapter
    folders, the settings that change the graphs and the OpenVINO (and nncf) versions, so a
    changed file or version gets a fresh conversion.
    """
    import openvino
    folder = _checkpoint_folder(config)
    adapter = os.path.abspath(os.path.expanduser(config.adapter)) if config.adapter else ''
    description = {
        'format': CONVERSION_FORMAT, 'model': config.model, 'folder': folder,
        'files': _file_stamps(folder), 'adapter': adapter, 'adapter_files': _file_stamps(adapter),
        'weights': weights, 'openvino': openvino.__version__,
    }
    if weights == 'int8':
        import nncf
        description['nncf'] = nncf.__version__
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    name = os.path.basename(os.path.normpath(config.model)) or 'model'
    safe_name = ''.join(char if char.isalnum() or char in '-_.' else '_' for char in name)
    return f'{safe_name}-{weights}-{digest[:16]}'


def _example_inputs(model, batch_size=1, prompt_length=3, past_length=2):
    """Return example inputs for tracing the image encoder and the decoder step."""
    vision = model.config.vision_config
    text = model.config.text_config
    pixel_values = torch.zeros(batch_size, 3, vision.image_size, vision.image_size)
    queries = model.config.num_query_tokens
    heads = text.num_attention_heads
    head_size = text.hidden_size // heads
    new = queries + prompt_length
    input_ids = torch.ones(batch_size, prompt_length, dtype=torch.long)
    prefix = torch.zeros(batch_size, queries, text.hidden_size)
    mask = torch.zeros(batch_size, 1, new, past_length + new)
    positions = torch.arange(past_length, past_length + new).expand(batch_size, -1)
    # A past of length > 0: an empty tensor in the traced concatenation does not convert.
    past = [torch.zeros(batch_size, heads, past_length, head_size)
            for _ in range(2 * text.num_hidden_layers)]
    return pixel_values, (input_ids, prefix, mask, positions, *past)


def convert(model, folder, weights):
    """
    Convert a loaded BLIP-2-OPT model into the two graphs and save them in ``folder``.

    ``weights`` 'int8' compresses the weights with nncf (INT8_ASYM, weight only). The graphs
    are written to a temporary folder that is renamed into place, so a conversion cut short
    never leaves a folder that looks whole.
    """
    import openvino
    pixel_values, step_inputs = _example_inputs(model)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.converting-', dir=parent)
    try:
        # The tracer warns about every Python branch it fixes; the shapes that vary (batch,
        # prompt and cache length) do not choose branches in these graphs.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            graphs = {
                IMAGE_ENCODER_FILE: openvino.convert_model(
                    ImageEncoder(model).eval(), example_input=pixel_values),
                DECODER_STEP_FILE: openvino.convert_model(
                    DecoderStep(model).eval(), example_input=step_inputs),
            }
        for name, graph in graphs.items():
            if weights == 'int8':
                graph = _compress_weights(graph)
            # fp32 must stay fp32: save_model would store the weights as fp16 by default.
            openvino.save_model(graph, os.path.join(staging, name), compress_to_fp16=False)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compress_weights(graph):
    """Return ``graph`` with 8-bit asymmetric weights (nncf), without nncf's progress tables."""
    nncf_logger = logging.getLogger('nncf')
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        import nncf
        return nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
    finally:
        nncf_logger.setLevel(level)


class OpenVINODecoder:
    """Greedy decoding with the two compiled graphs; what the captioner's decode loop does."""

    enabled = True
    compiled = False
    compile_cache = None
    static_cache = False

    def __init__(self, image_encoder, decoder_step, eos_ids, pad_id, num_query_tokens):
        """Keep the compiled graphs and the end and padding tokens."""
        self.image_request = image_encoder.create_infer_request()
        self.step_request = decoder_step.create_infer_request()
        self.eos_ids = np.asarray(eos_ids, np.int64)
        self.pad_id = int(pad_id)
        self.num_query_tokens = num_query_tokens
        self.cache_count = len(decoder_step.inputs) - 4
        shape = decoder_step.input(4).get_partial_shape() if self.cache_count else None
        self.heads = shape[1].get_length() if shape else 0
        self.head_size = shape[3].get_length() if shape else 0
        self.hidden_size = image_encoder.output(0).get_partial_shape()[2].get_length()

    def _step(self, input_ids, prefix, mask, positions, cache):
        # Shared inputs: the cache would otherwise be copied into the request at every token.
        outputs = self.step_request.infer([input_ids, prefix, mask, positions, *cache],
                                          share_inputs=True)
        values = list(outputs.values())
        return values[0], values[1:]

    def decode(self, pixel_values, input_ids, attention_mask, max_new_tokens, min_new_tokens):
        """
        Return the new token ids (batch, length) as generate() picks them greedily.

        Captions that have ended get padding; before ``min_new_tokens`` end tokens are ruled
        out, as generate() does.
        """
        pixel_values = pixel_values.numpy()
        text_ids = input_ids[:, self.num_query_tokens:].numpy()
        key_mask = attention_mask.numpy().astype(bool)
        batch_size, prompt_length = key_mask.shape
        image_queries = next(iter(self.image_request.infer([pixel_values]).values()))
        # Left padding: each row counts its positions from its own first real token.
        positions = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0)
        causal = np.tril(np.ones((prompt_length, prompt_length), bool))
        allowed = causal[None] & key_mask[:, None, :]
        mask = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
        cache = [np.zeros((batch_size, self.heads, 0, self.head_size), np.float32)
                 for _ in range(self.cache_count)]
        logits, cache = self._step(text_ids, image_queries, mask, positions, cache)
        no_prefix = np.zeros((batch_size, 0, self.hidden_size), np.float32)
        output = np.full((batch_size, max_new_tokens), self.pad_id, np.int64)
        unfinished = np.ones(batch_size, bool)
        position = positions[:, -1:]
        length = 0
        while True:
            if length < min_new_tokens and self.eos_ids.size:
                logits[:, self.eos_ids] = -np.inf
            tokens = np.where(unfinished, logits.argmax(-1), self.pad_id)
            output[:, length] = tokens
            unfinished &= ~np.isin(tokens, self.eos_ids)
            length += 1
            if length == max_new_tokens or (length >= min_new_tokens and not unfinished.any()):
                break
            # The new token sees every real position of the prompt and every earlier token.
            key_mask = np.concatenate([key_mask, np.ones((batch_size, 1), bool)], axis=1)
            mask = np.where(key_mask, 0.0, np.finfo(np.float32).min).astype(np.float32)
            position = position + 1
            logits, cache = self._step(tokens[:, None], no_prefix, mask[:, None, None],
                                       position, cache)
        return torch.from_numpy(output[:, :length])


class OpenVINOCaptioner(Blip2Captioner):
    """A BLIP-2-OPT checkpoint converted to OpenVINO, captioning uint8 RGB frames on the CPU."""

    backend = 'openvino'
    compile_decode = False

    def __init__(self, config=None):
        """Load, validate and convert (or reuse the conversion); raise ModelLoadError."""
        self.config = config = config or CaptionerConfig()
        self.weights = getattr(config, 'openvino_weights', 'fp32')
        _check_openvino_settings(config, self.weights)
        _refuse_encoder_decoder(config)
        try:
            import openvino
        except ImportError as error:
            raise ModelLoadError('backend openvino needs the openvino package: pip install '
                                 'openvino (and nncf for openvino_weights int8)') from error
        self.device = torch.device('cpu')
        self.model, self.processor, self.dtype = load_checkpoint(config, self.device)
        try:
            self._finish_setup()
            problem = self.length_problem(config.prompt, config.max_new_tokens)
            tokens = DecodeLoop(self.model, self.device, True, False)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ModelLoadError(
                f"cannot set up BLIP-2 model '{config.model}': {one_line(error)}") from error
        if problem:
            raise ModelLoadError(problem)
        if not tokens.enabled:
            raise ModelLoadError(
                f"the generation config of '{config.model}' asks for logits processing that "
                'backend openvino does not implement (it decodes greedily): use backend local')
        self.cache_folder = os.path.join(openvino_cache_folder(), cache_key(config, self.weights))
        self.converted_now = not os.path.isdir(self.cache_folder)
        if self.converted_now:
            self._convert()
        core = openvino.Core()
        # f32: on CPUs with bf16 support OpenVINO would otherwise compute in bf16 and the
        # captions would drift from the local backend's.
        options = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY',
                   'INFERENCE_NUM_THREADS': torch.get_num_threads()}
        try:
            graphs = [core.compile_model(os.path.join(self.cache_folder, name), 'CPU', options)
                      for name in (IMAGE_ENCODER_FILE, DECODER_STEP_FILE)]
        except RuntimeError as error:
            raise ModelLoadError(
                f'cannot load the converted model in {self.cache_folder} ({one_line(error)}): '
                'delete that folder to convert again') from error
        self.decoder = OpenVINODecoder(*graphs, tokens._eos_ids.tolist(), tokens._pad_id,
                                       self.num_query_tokens)
        self.decode_loop = True
        # The converted graphs hold their own copy of the weights.
        del self.model, tokens

    def _convert(self):
        LOGGER.info("converting '%s' to OpenVINO (%s weights), once for this checkpoint, "
                    'into %s', self.config.model, self.weights, self.cache_folder)
        started = time.monotonic()
        try:
            convert(self.model, self.cache_folder, self.weights)
        except OSError as error:
            raise ModelLoadError(
                f'cannot write the converted model to {self.cache_folder}: {one_line(error)}; '
                'set XDG_CACHE_HOME to a writable folder') from error
        except Exception as error:  # noqa: B902 - the converter fails in many ways, one line
            raise ModelLoadError(
                f"cannot convert '{self.config.model}' to OpenVINO: {one_line(error)}; use "
                'backend local') from error
        LOGGER.info('converted to OpenVINO in %.1f s', time.monotonic() - started)


def _check_openvino_settings(config, weights):
    """Refuse settings the OpenVINO backend cannot honour, before anything loads."""
    if weights not in OPENVINO_WEIGHTS:
        raise ModelLoadError(
            f"unknown openvino_weights '{weights}': use {' or '.join(OPENVINO_WEIGHTS)}")
    if config.device not in ('auto', 'cpu'):
        raise ModelLoadError(f"backend openvino runs on the CPU, not device '{config.device}': "
                             'use device auto or cpu, or backend local for a GPU')
    if config.dtype not in ('auto', 'float32'):
        raise ModelLoadError(f"backend openvino computes in float32, not dtype '{config.dtype}'"
                             ': use dtype auto or float32 (openvino_weights int8 for 8-bit '
                             'weights)')
    if getattr(config, 'quantization', 'none') != 'none':
        raise ModelLoadError('backend openvino does not take quantization '
                             f"'{config.quantization}': use openvino_weights int8 instead")
    if config.torch_compile:
        raise ModelLoadError('backend openvino does not use torch_compile: turn it off')
    # The local backend's checks of the prompt and caption length.
    _check_settings(config)


def _refuse_encoder_decoder(config):
    """Refuse a checkpoint whose language model is not OPT, from its config alone."""
    where = f"BLIP-2 model '{config.model}'"
    location, _ = locate_checkpoint(config.model, config.local_files_only, where)
    text_config = read_blip2_config(location, config.local_files_only, where,
                                    config.trust_remote_code).text_config
    if text_config.model_type != 'opt':
        raise ModelLoadError(
            'backend openvino takes BLIP-2 checkpoints with an OPT language model, and '
            f"'{config.model}' has {text_config.model_type}: use backend local for it")
