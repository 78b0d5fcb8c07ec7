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
The captioner: a batch of uint8 RGB frames in, one caption per frame out.

Nothing here knows about ROS. The node, the folder captioner, the dataset auto-labeller and the
evaluator all go through :func:`make_captioner` or :class:`Blip2Captioner`, so a checkpoint that
works in one works in all. :class:`Blip2Captioner` runs the model in this process and is made
of three parts, each in its own module: :mod:`blip2_ros.checkpoint` loads and validates the
checkpoint, :mod:`blip2_ros.preprocess` turns frames into pixel values, and
:mod:`blip2_ros.decode` is the static-cache, compiled decode loop. The 'openai' backend sends
the frames to a server instead (:mod:`blip2_ros.server_captioner`).
"""

from dataclasses import dataclass

# DEFAULT_MODEL, TRAINING_INFO_FILE and the training prompts are here for the captioner's
# callers.
from blip2_ros.checkpoint import (  # noqa: F401
    adapter_training_prompt, DEFAULT_MODEL, load_checkpoint, ModelLoadError, one_line,
    prompt_problem, resolve_device, TRAINING_INFO_FILE, training_prompt)
from blip2_ros.decode import DecodeLoop, NonFiniteScores
from blip2_ros.preprocess import FramePreprocessor
from blip2_ros.server_captioner import CaptionFailure
import numpy as np
import torch

PROMPT_CACHE_SIZE = 64

# Why a frame got no caption, for the node's counters and the folder captioner's lines.
NON_FINITE_SCORES = ("the model's scores turned NaN or inf while it captioned (a float16 "
                     'overflow, a broken fine-tune or adapter): try dtype float32 or bfloat16, '
                     'or another model or adapter')
# An empty caption is never published: it is a frame without a caption, counted and said.
EMPTY_CAPTION = ('the model gave an empty caption (it ended the caption at once): try the '
                 'prompt it was trained with, dtype float32, or another model or adapter')


@dataclass
class CaptionerConfig:
    """How to load and run a BLIP-2 checkpoint."""

    model: str = DEFAULT_MODEL
    adapter: str = ''
    device: str = 'auto'
    dtype: str = 'auto'
    local_files_only: bool = False
    allow_pickle: bool = False
    # Run the code a checkpoint names in its config.json (auto_map); only for trusted sources.
    trust_remote_code: bool = False
    max_new_tokens: int = 30
    prompt: str = ''
    # 'static' pre-allocates the KV cache so the decode step has fixed shapes (CUDA graphs,
    # torch.compile); 'dynamic' is the library default.
    cache: str = 'dynamic'
    torch_compile: bool = False
    # Weight-only 'int8' (torchao, CPU and CUDA) or 'int4' (bitsandbytes NF4, CUDA); 'none'.
    quantization: str = 'none'
    # 'local' runs the model in this process; 'openai' sends the frames to an OpenAI-compatible
    # server (vLLM), and then ``model`` is the name the server serves.
    backend: str = 'local'
    server_url: str = ''
    api_key_env: str = ''
    request_timeout: float = 10.0
    # The served model's input size: frames are resized to it before they are sent.
    server_image_size: int = 224
    max_in_flight: int = 8
    # backend 'openvino': 'fp32' (captions equal the local backend's) or 'int8' (nncf weight
    # compression: faster, captions may change a little).
    openvino_weights: str = 'fp32'


BACKENDS = ('local', 'openai', 'openvino')


def make_captioner(config):
    """Return the captioner ``config.backend`` names; raise ModelLoadError if it cannot work."""
    if config.backend == 'openai':
        from blip2_ros.server_captioner import ServerCaptioner
        return ServerCaptioner(config)
    if config.backend == 'openvino':
        from blip2_ros.openvino_captioner import OpenVINOCaptioner
        return OpenVINOCaptioner(config)
    if config.backend != 'local':
        names = ', '.join(BACKENDS[:-1])
        raise ModelLoadError(f"unknown backend '{config.backend}': use {names} or {BACKENDS[-1]}")
    return Blip2Captioner(config)


def caption_results(captioner, frames, prompt=None, max_new_tokens=None):
    """
    Caption ``frames`` with any backend; return per frame its caption or a CaptionFailure.

    What the node and the folder captioner publish. An empty caption comes back as the failure
    'empty_caption'; with the local backends a frame whose scores turned NaN or inf comes back
    as 'non_finite_scores'. Each says what to try.
    """
    options = {'failures': True} if isinstance(captioner, Blip2Captioner) else {}
    results = captioner.caption(frames, prompt=prompt, max_new_tokens=max_new_tokens, **options)
    return [CaptionFailure('empty_caption', EMPTY_CAPTION) if result == '' else result
            for result in results]


class Blip2Captioner:
    """A loaded BLIP-2 checkpoint that captions batches of uint8 RGB frames."""

    backend = 'local'

    def __init__(self, config=None):
        """Load the model, processor and optional LoRA adapter; raise ModelLoadError on failure."""
        self.config = config = config or CaptionerConfig()
        self.device = resolve_device(config.device)
        _check_settings(config)
        self.model, self.processor, self.dtype = load_checkpoint(config, self.device)
        try:
            self._finish_setup()
            problem = self.length_problem(config.prompt, config.max_new_tokens)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            # The checkpoint's processor or generation settings do not fit its model.
            raise ModelLoadError(
                f"cannot set up BLIP-2 model '{config.model}': {one_line(error)}") from error
        if problem:
            raise ModelLoadError(problem)

    @classmethod
    def from_model(cls, model, processor, config=None):
        """
        Wrap a BLIP-2 model and processor that are already in memory.

        For code that builds or trains the model itself (benchmarks, evaluation during
        training); ``config`` supplies the generation options, its loading fields are ignored.
        With torch_compile on a GPU, the language model's Linear layers with a bias become
        OneRowLinear layers, which compute what they did except inside compiled code.
        """
        captioner = cls.__new__(cls)
        captioner.config = config or CaptionerConfig(model=str(model.name_or_path or ''))
        _check_cache(captioner.config.cache)
        captioner.processor = processor
        captioner.model = model.eval()
        captioner.device = next(model.vision_model.parameters()).device
        captioner.dtype = next(model.vision_model.parameters()).dtype
        captioner._finish_setup()
        return captioner

    def _finish_setup(self):
        self.is_encoder_decoder = bool(self.model.config.text_config.is_encoder_decoder)
        tokenizer = self.processor.tokenizer
        # Decoder-only models continue the text where it ends, so pad on the left; encoders
        # read the whole prompt, so pad on the right.
        tokenizer.padding_side = 'right' if self.is_encoder_decoder else 'left'
        self.image_token_id = self.model.config.image_token_id
        self.num_query_tokens = self.model.config.num_query_tokens
        # T5's relative positions have no fixed limit; OPT's learned ones do.
        self.max_positions = (None if self.is_encoder_decoder else getattr(
            self.model.config.text_config, 'max_position_embeddings', None))
        self._prompt_cache = {}
        self.preprocess = FramePreprocessor(self.processor.image_processor, self.device,
                                            self.dtype)
        # Compiling the decode step pays off only with fixed shapes, so it implies the static
        # cache.
        static_cache = self.config.cache == 'static' or self.config.torch_compile
        self.decoder = DecodeLoop(self.model, self.device, static_cache,
                                  self.config.torch_compile)
        # What the node and the benchmarks read, fixed from here on.
        self.fast_preprocessing = self.preprocess.fast
        self.image_size = self.preprocess.image_size
        self.static_cache = static_cache
        self.decode_loop = self.decoder.enabled
        self.compile_cache = self.decoder.compile_cache

    @property
    def compile_decode(self):
        """Whether the decode loop runs compiled (False again once compiling has failed)."""
        return self.decoder.compiled

    def length_problem(self, prompt, max_new_tokens):
        """Return why a prompt and caption length overflow the language model, or None."""
        if not self.max_positions:
            return None
        input_ids, _ = self._encode_prompts([prompt])
        return self._length_problem(input_ids.shape[1], max_new_tokens)

    def _length_problem(self, input_length, max_new_tokens):
        needed = input_length + max_new_tokens
        if self.max_positions and needed > self.max_positions:
            return (f'the prompt ({input_length - self.num_query_tokens} tokens), the '
                    f'{self.num_query_tokens} image tokens and max_new_tokens {max_new_tokens} '
                    f'need {needed} positions, more than the {self.max_positions} of the '
                    'language model: shorten the prompt or lower max_new_tokens')
        return None

    def _encode_prompts(self, prompts):
        key = tuple(prompts)
        cached = self._prompt_cache.get(key)
        if cached is None:
            tokenizer = self.processor.tokenizer
            text = tokenizer(list(prompts), padding=True, return_tensors='pt')
            count = len(prompts)
            # BLIP-2 puts the query-token placeholders before everything else, BOS included.
            image_ids = torch.full((count, self.num_query_tokens), self.image_token_id)
            input_ids = torch.cat([image_ids, text['input_ids']], dim=1)
            attention_mask = torch.cat(
                [torch.ones_like(image_ids), text['attention_mask']], dim=1)
            cached = (input_ids.to(self.device), attention_mask.to(self.device))
            if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.clear()
            self._prompt_cache[key] = cached
        return cached

    def warm_up(self, batch_sizes=(1,), prompt=None):
        """
        Caption a blank frame once per batch size, so that compiling happens now.

        With torch_compile, the first batch size compiles the prefill and the decode step, and
        the second one compiles them again for any batch size (minutes each for a full-size
        model on a GPU); every later size only records its CUDA graphs. Call this at start-up
        with the batch sizes to expect, so the first camera frames are not the ones that wait.
        """
        height, width = self.image_size if self.fast_preprocessing else (224, 224)
        blank = np.zeros((height, width, 3), np.uint8)
        max_new_tokens = self.config.max_new_tokens
        for batch_size in batch_sizes:
            # Run the decode loop to its end: all of its steps share one compiled shape.
            self.caption([blank] * batch_size, prompt=prompt, min_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def caption(self, frames, prompt=None, max_new_tokens=None, failures=False,
                min_new_tokens=0):
        """
        Caption a batch of HxWx3 uint8 RGB frames in one decode.

        ``prompt`` is one string for all frames or one per frame (None: the configured prompt).
        Decoding is greedy, so the same frame gives the same caption; ``min_new_tokens`` rules
        out ending before that many tokens (the warm-up uses it). A frame whose scores turned
        NaN or inf gets '' (its tokens are garbage), or with ``failures`` a CaptionFailure
        saying what to try.
        """
        frames = list(frames)
        if not frames:
            return []
        prompt = self.config.prompt if prompt is None else prompt
        prompts = [prompt] * len(frames) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(frames):
            raise ValueError(f'{len(prompts)} prompts for {len(frames)} frames')
        if max_new_tokens is None:
            max_new_tokens = self.config.max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f'max_new_tokens must be 1 or more, not {max_new_tokens}')
        input_ids, attention_mask = self._encode_prompts(prompts)
        # Past the last position an index error, or on a GPU a device-side assert that breaks
        # every later call, would say nothing useful.
        problem = self._length_problem(input_ids.shape[1], max_new_tokens)
        if problem:
            raise ValueError(problem)
        pixel_values = self.preprocess(frames)
        if self.decoder.enabled:
            output = self.decoder.decode(pixel_values, input_ids, attention_mask, max_new_tokens,
                                         min_new_tokens)
            # The OpenVINO decoder does not check its scores.
            non_finite = getattr(self.decoder, 'non_finite_rows', None)
        else:
            output, non_finite = self._generate(pixel_values, input_ids, attention_mask,
                                                max_new_tokens, min_new_tokens)
        texts = self.processor.tokenizer.batch_decode(output, skip_special_tokens=True)
        captions = [text.strip() for text in texts]
        if non_finite is None or not bool(non_finite.any()):
            return captions
        return [(CaptionFailure('non_finite_scores', NON_FINITE_SCORES) if failures else '')
                if bad else caption for caption, bad in zip(captions, non_finite.tolist())]

    def _generate(self, pixel_values, input_ids, attention_mask, max_new_tokens, min_new_tokens):
        """
        Decode greedily with generate() (for the logits processing the checkpoint asks for).

        Runs on a reused static cache where one is kept. Returns the new tokens only, and which
        rows' scores turned NaN or inf.
        """
        check = NonFiniteScores()
        # Greedy whatever the checkpoint's generation config says, like the decode loop.
        # generate() would compile its own step on a static cache; the decode loop is the
        # compiled path here.
        options = {'max_new_tokens': max_new_tokens, 'do_sample': False, 'num_beams': 1,
                   'logits_processor': [check], 'disable_compile': True}
        if min_new_tokens:
            options['min_new_tokens'] = min_new_tokens
        if self.decoder.static_cache:
            options['past_key_values'], _ = self.decoder.static_cache_for(
                input_ids.shape[0], input_ids.shape[1], max_new_tokens)
        output = self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
            **options)
        # Decoder-only generate returns the prompt too.
        return (output if self.is_encoder_decoder else output[:, input_ids.shape[1]:],
                check.rows)


def _check_cache(cache):
    if cache not in ('dynamic', 'static'):
        raise ModelLoadError(f"unknown cache '{cache}': use dynamic or static")


def _check_settings(config):
    """Refuse generation settings that cannot work, before minutes of loading."""
    _check_cache(config.cache)
    problem = prompt_problem(config.prompt)
    if problem:
        raise ModelLoadError(problem)
    max_new_tokens = config.max_new_tokens
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ModelLoadError(f'max_new_tokens must be 1 or more, not {max_new_tokens!r}')
