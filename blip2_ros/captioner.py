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
BLIP-2 inference: load a checkpoint, turn a batch of RGB frames into captions.

Nothing here knows about ROS. The node, the folder captioner, the dataset auto-labeller and the
evaluator all go through :class:`Blip2Captioner`, so a checkpoint that works in one works in all.
"""

from dataclasses import dataclass
import json
import logging
import os

import numpy as np
from safetensors import SafetensorError
import torch
import torch.nn.functional as F

LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = 'Salesforce/blip2-opt-2.7b'
# Written by training.train next to the model or adapter it saves: the prompt it trained with.
TRAINING_INFO_FILE = 'blip2_ros_training.json'
MAX_PROMPT_CHARS = 2000
DEVICE_HELP = "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
# PIL resample codes used by Hugging Face image processors -> torch interpolation modes.
RESAMPLE_MODES = {2: 'bilinear', 3: 'bicubic'}
# Static KV caches kept, one per batch shape: enough for one per batch size a node with up to
# 8 cameras sees, at two caption lengths (blip2-opt-2.7b: about 21 MB per frame of batch).
MAX_STATIC_CACHES = 16
STATIC_CACHE_ROUNDING = 16
# torch.compile makes one version of a compiled function per batch shape (and per model kind
# and cache length); torch's default of 8 versions per function would leave a node with many
# cameras, or a process with several captioners, decoding uncompiled.
COMPILED_VERSIONS = 64
# The decode loop asks the GPU whether every caption has ended only every few tokens: asking
# waits for the GPU, and the CPU should stay ahead of it, queueing the next steps.
EOS_CHECK_INTERVAL = 4
# torch.compile's settings on GPUs: 'reduce-overhead' (CUDA graphs) for everything before the
# first token; for the decode step also kernels tuned by coordinate descent, which its one-row
# products need to read the weights near the GPU's bandwidth (OneRowLinear). Tuning costs
# compile time, so only the graph that runs once per token gets it.
CUDA_COMPILE_OPTIONS = {'triton.cudagraphs': True}
CUDA_STEP_COMPILE_OPTIONS = dict(CUDA_COMPILE_OPTIONS, coordinate_descent_tuning=True)
# Generation settings that change greedy decoding and that the decode loop does not implement,
# with their neutral values. A checkpoint whose generation config sets one decodes through
# generate(), which honours them.
LOGITS_PROCESSING_SETTINGS = {
    'repetition_penalty': 1.0, 'encoder_repetition_penalty': 1.0, 'no_repeat_ngram_size': 0,
    'encoder_no_repeat_ngram_size': 0, 'bad_words_ids': None, 'sequence_bias': None,
    'suppress_tokens': None, 'begin_suppress_tokens': None, 'forced_bos_token_id': None,
    'forced_eos_token_id': None, 'min_length': 0, 'min_new_tokens': None,
    'exponential_decay_length_penalty': None, 'renormalize_logits': False,
}


class OneRowLinear(torch.nn.Linear):
    """
    An nn.Linear whose one-row product, when compiled, is a reduction inductor writes and tunes.

    A batch-1 decode step multiplies one row by every weight matrix of the language model, so
    its speed is how fast those weights are read. For OPT-2.7b's layers, which have a bias,
    cuBLAS's kernels read them at 1.5 to 2.3 TB/s on an H200; this reduction, tuned by
    coordinate descent, at 2.3 to 3.3 TB/s (benchmarks/bench_gpu_matmul.py). torch makes
    such a reduction itself, with coordinate_descent_tuning on, of one-row matmuls without a
    bias, so only layers with a bias need this class. Eager calls, and calls with more rows,
    are nn.Linear's.
    """

    def forward(self, input):  # noqa: A002 - nn.Linear's argument name
        """Compute ``input @ weight.T + bias``."""
        if not torch.compiler.is_compiling() or input.shape[:-1].numel() != 1:
            return super().forward(input)
        # In float32, as torch's own decomposition computes it; inductor fuses the upcast,
        # the product and the sum into one kernel that reads the weight once.
        output = (input.unsqueeze(-2).float() * self.weight.float()).sum(-1)
        if self.bias is not None:
            output = output + self.bias.float()
        return output.to(input.dtype)


def use_one_row_reductions(module, enable=True):
    """Make each nn.Linear with a bias in ``module`` a OneRowLinear (enable False: undo it)."""
    old, new = (torch.nn.Linear, OneRowLinear) if enable else (OneRowLinear, torch.nn.Linear)
    for layer in module.modules():
        if type(layer) is old and layer.bias is not None:
            layer.__class__ = new


def compile_cache_folder():
    """
    Return the folder where torch.compile keeps compiled code for the captioner.

    The folder TORCHINDUCTOR_CACHE_DIR names, if it is not torch's default (torch sets the
    variable to its default itself when it imports its compiler); else
    ``$XDG_CACHE_HOME/blip2_ros/torch_compile``, by default under ``~/.cache``.
    """
    chosen = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:  # another torch: take any folder set as the user's choice
        torch_default = None
    if chosen and os.path.abspath(chosen) != torch_default:
        return chosen
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(home, 'blip2_ros', 'torch_compile')


def keep_compiled_code():
    """
    Make torch.compile keep what it compiles where a reboot leaves it; return that folder.

    torch keeps compiled code and kernel tunings in the system's temporary folder, which a
    reboot empties, so a robot's node would compile for minutes at every start. With the cache
    kept (``compile_cache_folder``), a later start reuses it. If the folder cannot be made (a
    read-only home), torch's default stays and None is returned. This sets
    TORCHINDUCTOR_CACHE_DIR for the whole process, as torch itself does.
    """
    folder = compile_cache_folder()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        LOGGER.info('compiled code is not kept across reboots: %s', _one_line(error))
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        LOGGER.info('compiled code is not kept across reboots: cannot write to %s', folder)
        return None
    os.environ['TORCHINDUCTOR_CACHE_DIR'] = folder
    return folder


def _copies(*tensors):
    """Clone a CUDA graph's outputs (None stays): they live in its memory until its next replay."""
    return tuple(None if tensor is None else tensor.clone() for tensor in tensors)


class ModelLoadError(RuntimeError):
    """A checkpoint, adapter, device or dtype that cannot be used; the message is one line."""


@dataclass
class CaptionerConfig:
    """How to load and run a BLIP-2 checkpoint."""

    model: str = DEFAULT_MODEL
    adapter: str = ''
    device: str = 'auto'
    dtype: str = 'auto'
    local_files_only: bool = False
    allow_pickle: bool = False
    max_new_tokens: int = 30
    prompt: str = ''
    num_beams: int = 1
    # 'static' pre-allocates the KV cache so the decode step has fixed shapes (CUDA graphs,
    # torch.compile); 'dynamic' is the library default.
    cache: str = 'dynamic'
    torch_compile: bool = False
    # 'local' runs the model in this process; 'openai' sends the frames to an OpenAI-compatible
    # server (vLLM), and then ``model`` is the name the server serves.
    backend: str = 'local'
    server_url: str = ''
    api_key_env: str = ''
    request_timeout: float = 10.0
    # The served model's input size: frames are resized to it before they are sent.
    server_image_size: int = 224
    max_in_flight: int = 8


BACKENDS = ('local', 'openai')


def make_captioner(config):
    """Return the captioner ``config.backend`` names; raise ModelLoadError if it cannot work."""
    if config.backend == 'openai':
        from blip2_ros.server_captioner import ServerCaptioner
        return ServerCaptioner(config)
    if config.backend != 'local':
        raise ModelLoadError(f"unknown backend '{config.backend}': use {' or '.join(BACKENDS)}")
    return Blip2Captioner(config)


def resolve_device(device):
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' into a torch.device that exists on this machine."""
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cpu':
        return torch.device('cpu')
    if device == 'cuda' or (device.startswith('cuda:') and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device '{device}' was asked for but torch sees no CUDA GPU "
                f'(torch {torch.__version__}); use device auto or cpu')
        index = int(device[5:]) if ':' in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device '{device}' does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
        return torch.device('cuda', index)
    raise ModelLoadError(f"unknown device '{device}': {DEVICE_HELP}")


def resolve_dtype(dtype, device, is_encoder_decoder):
    """Pick the weight dtype: bf16 on GPUs that support it, fp32 on CPU, never fp16 for T5."""
    if dtype == 'auto':
        if device.type != 'cuda':
            return torch.float32
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32 if is_encoder_decoder else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(
            f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    if dtype == 'float16' and is_encoder_decoder:
        raise ModelLoadError(
            'float16 overflows in Flan-T5 and gives empty or garbage captions; '
            'use dtype bfloat16 or float32')
    return DTYPES[dtype]


def _one_line(error):
    text = ' '.join(str(error).split())
    return text if len(text) <= 300 else text[:297] + '...'


def _check_model_source(model, local_files_only, where):
    """Fail early, with a message that says what to do, where from_pretrained's would not."""
    if os.path.isdir(model):
        return
    looks_like_path = (os.path.isabs(model) or model.startswith(('.', '~'))
                       or model.count('/') > 1 or os.sep != '/' and os.sep in model)
    if looks_like_path:
        raise ModelLoadError(
            f'cannot load {where}: no such folder; give an existing checkpoint folder '
            'or a hub id such as Salesforce/blip2-opt-2.7b')
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(model)
    except HFValidationError as error:
        raise ModelLoadError(
            f'cannot load {where}: no such folder, and not a valid hub id; give an existing '
            'checkpoint folder or a hub id such as Salesforce/blip2-opt-2.7b') from error
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model, 'config.json'), str):
            raise ModelLoadError(
                f'cannot load {where}: it is not in the local model cache and local_files_only '
                'is set; download it once on a machine with network access or give a folder')


def training_prompt(*folders, default=''):
    """
    Return the prompt training.train saved in the first of ``folders`` that has one.

    A model learns to continue the prompt it was trained with, so that is the prompt to
    caption with. Hub ids and folders without the file are skipped; ``default`` if none has it.
    """
    for folder in folders:
        path = os.path.join(folder or '', TRAINING_INFO_FILE)
        if not folder or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding='utf-8') as stream:
                prompt = json.load(stream).get('prompt', '')
        except (OSError, ValueError, AttributeError) as error:
            raise ModelLoadError(f'cannot read the training prompt in {path}: '
                                 f'{_one_line(error)}') from error
        if not isinstance(prompt, str):
            raise ModelLoadError(f'the training prompt in {path} is not text: {prompt!r}')
        problem = prompt_problem(prompt)
        if problem:
            raise ModelLoadError(f'the training prompt in {path} cannot be used: {problem}')
        return prompt
    return default


def prompt_problem(prompt):
    """Return why ``prompt`` cannot be captioned with, or None if it can."""
    if '<image>' in prompt:
        # The processor puts the image's query tokens in; one more breaks every batch.
        return 'prompt must not contain the <image> token'
    if len(prompt) > MAX_PROMPT_CHARS:
        return f'prompt is longer than {MAX_PROMPT_CHARS} characters'
    return None


def resize_like_pil(image, size, mode):
    """
    Resize a 1x3xHxW uint8 image to ``size`` with antialiasing, the way PIL resamples uint8.

    On the CPU this is torch's uint8 kernel, which follows PIL's integer arithmetic to within
    one level. Other devices have no uint8 kernel, so the image is resized in float one axis
    at a time, horizontal pass first, rounded and clipped to 0..255 after each pass as PIL's
    uint8 intermediate image is: bicubic overshoots, and clipping only at the end is off by up
    to 20 levels when upscaling. The result is uint8 on the CPU and integral float elsewhere.
    Pillow 13 resizes some tall images vertically first, which moves the clipping; that differs
    from this by a level or two on natural images and more on noise.
    """
    if image.dtype == torch.uint8 and image.device.type == 'cpu':
        image = image.contiguous(memory_format=torch.channels_last)
        return F.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False)
    image = image.float()
    height, width = image.shape[-2:]
    if width != size[1]:
        image = _round_half_up_to_uint8_range(F.interpolate(
            image, size=(height, size[1]), mode=mode, antialias=True, align_corners=False))
    if height != size[0]:
        image = _round_half_up_to_uint8_range(F.interpolate(
            image, size=tuple(size), mode=mode, antialias=True, align_corners=False))
    return image


def _round_half_up_to_uint8_range(image):
    # PIL rounds halves up; torch.round rounds them to even, and bilinear weights make many
    # exact halves.
    return image.add_(0.5).floor_().clamp_(0, 255)


def _tokenizer_problem(tokenizer, text_config):
    """Return why a checkpoint's tokenizer cannot be the one of its language model, or None."""
    vocabulary = text_config.vocab_size
    # Embedding tables are often rounded up (blip2-opt-2.7b: 50272 rows for 50266 tokens), so
    # only a tokenizer far smaller than the table is wrong for sure. transformers makes such a
    # tokenizer, without a pad token, from a folder that lacks the tokenizer files; its
    # captions would be garbage.
    if tokenizer.pad_token is not None and len(tokenizer) >= vocabulary // 2:
        return None
    pad = 'a' if tokenizer.pad_token is not None else 'no'
    return (f'its tokenizer ({len(tokenizer)} tokens, {pad} pad token) does not fit its '
            f'language model ({vocabulary} tokens): the tokenizer files (tokenizer.json, '
            'tokenizer_config.json) are missing or wrong; save the Blip2Processor next to the '
            'model')


def _adapter_covers_whole_model(adapter_weights, model):
    """Tell a LoRA saved on the whole BLIP-2 from one saved on its language model alone."""
    top_level = {name for name, _ in model.named_children()} | {'query_tokens'}
    for key in adapter_weights:
        if key.startswith('base_model.model.') and key.split('.')[2] in top_level:
            return True
    return False


def _merge_adapter(model, adapter, allow_pickle):
    """
    Apply a LoRA adapter folder to a loaded BLIP-2 and merge it into the weights.

    Both forms the training tools write are accepted: LoRA on the whole
    Blip2ForConditionalGeneration (keys under ``language_model.``) and LoRA on its language
    model alone. An adapter whose weights do not all land on a layer is refused, since peft
    would only warn and run the base model.
    """
    if not os.path.isdir(adapter):
        raise ModelLoadError(f"LoRA adapter folder '{adapter}' does not exist")
    if not os.path.isfile(os.path.join(adapter, 'adapter_model.safetensors')):
        if not os.path.isfile(os.path.join(adapter, 'adapter_model.bin')):
            raise ModelLoadError(
                f"LoRA adapter folder '{adapter}' holds no adapter_model.safetensors; "
                'give the folder that save_pretrained wrote')
        if not allow_pickle:
            raise ModelLoadError(
                f"LoRA adapter '{adapter}' has only pickle weights (adapter_model.bin); "
                're-save it as safetensors, or set allow_pickle if you trust its source')
    try:
        from peft import PeftConfig, PeftModel, set_peft_model_state_dict
        from peft.utils import load_peft_weights
    except ImportError as error:
        raise ModelLoadError(
            'a LoRA adapter was given but peft is not installed: pip install peft') from error
    try:
        peft_config = PeftConfig.from_pretrained(adapter)
        if peft_config.is_prompt_learning:
            raise ModelLoadError(
                f"adapter '{adapter}' is a {peft_config.peft_type} prompt-learning adapter, "
                'which cannot be merged; train a LoRA adapter')
        adapter_weights = load_peft_weights(adapter, device='cpu')
        whole_model = _adapter_covers_whole_model(adapter_weights, model)
        target = model if whole_model else model.language_model
        peft_model = PeftModel(target, peft_config)
        load_result = set_peft_model_state_dict(peft_model, adapter_weights)
    except ModelLoadError:
        raise
    except SafetensorError as error:
        raise ModelLoadError(
            f"LoRA adapter '{adapter}' has a damaged weight file ({_one_line(error)}); "
            'save or copy the adapter again') from error
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ModelLoadError(
            f"cannot apply LoRA adapter '{adapter}': {_one_line(error)}") from error
    # Adapter parameters carry the adapter name ('lora_A.default.weight'); the base model's
    # own weights are always "missing" from an adapter file.
    missing = [key for key in load_result.missing_keys if '.default.' in key]
    if load_result.unexpected_keys or missing:
        unmatched = (load_result.unexpected_keys or missing)[0]
        raise ModelLoadError(
            f"LoRA adapter '{adapter}' does not fit this model: "
            f'{len(load_result.unexpected_keys)} adapter weights match no layer and '
            f'{len(missing)} adapter layers got no weights (first: {unmatched}); '
            'use the base model the adapter was trained on')
    # Merged weights run exactly as fast as the base model.
    merged = peft_model.merge_and_unload()
    if whole_model:
        return merged
    model.language_model = merged
    return model


class Blip2Captioner:
    """A loaded BLIP-2 checkpoint that captions batches of uint8 RGB frames."""

    backend = 'local'

    def __init__(self, config=None):
        """Load the model, processor and optional LoRA adapter; raise ModelLoadError on failure."""
        from transformers import AutoConfig, Blip2ForConditionalGeneration, Blip2Processor

        self.config = config = config or CaptionerConfig()
        self.device = resolve_device(config.device)
        if config.cache not in ('dynamic', 'static'):
            raise ModelLoadError(f"unknown cache '{config.cache}': use dynamic or static")
        problem = prompt_problem(config.prompt)
        if problem:
            raise ModelLoadError(problem)
        max_new_tokens = config.max_new_tokens
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ModelLoadError(f'max_new_tokens must be 1 or more, not {max_new_tokens!r}')
        load_args = {'local_files_only': config.local_files_only}
        where = f"BLIP-2 model '{config.model}'"
        _check_model_source(config.model, config.local_files_only, where)
        try:
            model_config = AutoConfig.from_pretrained(config.model, **load_args)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f'cannot load {where}: {_one_line(error)}') from error
        if getattr(model_config, 'model_type', '') != 'blip-2':
            raise ModelLoadError(
                f"cannot load {where}: it is a '{model_config.model_type}' model, not BLIP-2")
        self.is_encoder_decoder = bool(model_config.text_config.is_encoder_decoder)
        self.dtype = resolve_dtype(config.dtype, self.device, self.is_encoder_decoder)
        try:
            self.processor = Blip2Processor.from_pretrained(config.model, **load_args)
            # Checked before the weights load, which takes minutes for a full-size model.
            problem = _tokenizer_problem(self.processor.tokenizer, model_config.text_config)
            if problem:
                raise ModelLoadError(f'cannot load {where}: {problem}')
            # Never trust_remote_code: a checkpoint must not run code of its own on a robot.
            # allow_pickle only widens the choice: safetensors still win where both exist.
            model = Blip2ForConditionalGeneration.from_pretrained(
                config.model, dtype=self.dtype,
                use_safetensors=None if config.allow_pickle else True,
                trust_remote_code=False, **load_args)
        except ModelLoadError:
            raise
        except SafetensorError as error:
            raise ModelLoadError(
                f'cannot load {where}: a weight file is damaged ({_one_line(error)}); download '
                'or save the checkpoint again') from error
        except (OSError, ValueError, RuntimeError, TypeError) as error:
            hint = ''
            if not config.allow_pickle and 'safetensors' in str(error).lower():
                hint = ' (the checkpoint has no safetensors weights; allow_pickle loads it)'
            raise ModelLoadError(f'cannot load {where}: {_one_line(error)}{hint}') from error
        if config.adapter:
            model = _merge_adapter(model, config.adapter, config.allow_pickle)
        try:
            self.model = model.to(self.device).eval()
        except torch.OutOfMemoryError as error:
            raise ModelLoadError(
                f'{where} does not fit in {self.device} memory as {self.dtype}: '
                'use a smaller model, dtype bfloat16/float16, or device cpu') from error
        try:
            self._finish_setup()
            problem = self.length_problem(config.prompt, config.max_new_tokens)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            # The checkpoint's processor or generation settings do not fit its model.
            raise ModelLoadError(f'cannot set up {where}: {_one_line(error)}') from error
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
        if captioner.config.cache not in ('dynamic', 'static'):
            raise ModelLoadError(
                f"unknown cache '{captioner.config.cache}': use dynamic or static")
        captioner.processor = processor
        captioner.model = model.eval()
        captioner.device = next(model.vision_model.parameters()).device
        captioner.dtype = next(model.vision_model.parameters()).dtype
        captioner.is_encoder_decoder = bool(model.config.text_config.is_encoder_decoder)
        captioner._finish_setup()
        return captioner

    def _finish_setup(self):
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
        self._set_up_preprocessing()
        # Compiling the decode step pays off only with fixed shapes, so it implies the static
        # cache.
        self.static_cache = self.config.cache == 'static' or self.config.torch_compile
        self.compile_decode = self.config.torch_compile
        # One static cache per batch shape, reused: the compiled step and its CUDA graph are
        # tied to the cache's buffers, so a fresh cache for every call would re-record it.
        self._static_caches = {}
        self._set_up_decode_loop()

    def _set_up_decode_loop(self):
        """
        Decide whether greedy captions come from this module's decode loop or from generate().

        The loop runs the language model on the static cache one token at a time with
        everything on the device: no logits processors, no per-token host synchronisation, and
        with torch_compile one compiled step (a CUDA graph on GPUs). It gives the captions
        generate() gives; settings it does not implement send decoding back to generate().
        """
        language_model = self.model.language_model
        settings = language_model.generation_config
        unsupported = [name for name, neutral in LOGITS_PROCESSING_SETTINGS.items()
                       if getattr(settings, name, neutral) not in (neutral, None)]
        self.decode_loop = self.static_cache and self.config.num_beams == 1 and not unsupported
        if self.static_cache and unsupported:
            LOGGER.info('the checkpoint sets %s; decoding with generate()', unsupported[0])
        eos = settings.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos_ids = torch.tensor(eos, dtype=torch.long, device=self.device)
        # Added to the scores: 0 everywhere, or -inf on the end tokens while they are ruled out.
        vocabulary = language_model.get_output_embeddings().weight.shape[0]
        self._no_eos_bias = torch.zeros(vocabulary, device=self.device)
        self._eos_ban = self._no_eos_bias.index_fill(0, self._eos_ids, float('-inf'))
        pad = settings.pad_token_id
        self._pad_id = eos[0] if pad is None and eos else int(pad or 0)
        self._decoder_start_id = settings.decoder_start_token_id
        if self._decoder_start_id is None:
            self._decoder_start_id = getattr(
                self.model.config.text_config, 'decoder_start_token_id', None)
        # Everything before the first token, and the decode step: fixed shapes per batch size.
        self._compiled = {}
        self.compile_cache = None
        if self.compile_decode and self.decode_loop:
            self.compile_cache = keep_compiled_code()
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, COMPILED_VERSIONS)
            cuda = self.device.type == 'cuda'
            if cuda:
                use_one_row_reductions(language_model)
            # fullgraph: a graph break would silently split a graph and lose its CUDA graph.
            self._compiled = {
                function.__name__: torch.compile(function, options=options if cuda else None,
                                                 fullgraph=True)
                for function, options in ((self._prefill, CUDA_COMPILE_OPTIONS),
                                          (self._decode_step, CUDA_STEP_COMPILE_OPTIONS))}
        elif self.compile_decode:
            LOGGER.warning('torch_compile needs greedy decoding without logits processors; '
                           'decoding runs uncompiled')
            self.compile_decode = False

    def _set_up_preprocessing(self):
        image_processor = self.processor.image_processor
        size = image_processor.size
        height = size.get('height') if hasattr(size, 'get') else getattr(size, 'height', None)
        width = size.get('width') if hasattr(size, 'get') else getattr(size, 'width', None)
        resample = int(getattr(image_processor, 'resample', 3))
        self.fast_preprocessing = (
            bool(image_processor.do_resize) and height is not None and width is not None
            and resample in RESAMPLE_MODES
            and not getattr(image_processor, 'do_center_crop', False)
            and not getattr(image_processor, 'do_pad', False))
        if not self.fast_preprocessing:
            LOGGER.warning('image processor settings not covered by the fast path; '
                           'using the checkpoint image processor')
            return
        self.image_size = (int(height), int(width))
        self.resize_mode = RESAMPLE_MODES[resample]
        # Rescale and normalise folded into one multiply-add per channel.
        scale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        mean = np.asarray(image_processor.image_mean if image_processor.do_normalize else 0.0)
        std = np.asarray(image_processor.image_std if image_processor.do_normalize else 1.0)
        gain = scale / std * np.ones(3)
        offset = -mean / std * np.ones(3)
        self._gain_array = gain.astype(np.float32).reshape(3, 1, 1)
        self._offset_array = offset.astype(np.float32).reshape(3, 1, 1)
        self._gain = torch.tensor(gain, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._offset = torch.tensor(offset, dtype=torch.float32,
                                    device=self.device).view(1, 3, 1, 1)

    def preprocess(self, frames):
        """
        Turn HxWx3 uint8 RGB frames into the model's ``pixel_values`` on the model's device.

        Frames go to the device as uint8 (a quarter of the bytes of float32) and are resized
        there with antialiased interpolation, which is what PIL does inside the checkpoint's own
        image processor.
        """
        if not self.fast_preprocessing:
            inputs = self.processor.image_processor(list(frames), return_tensors='pt')
            return inputs['pixel_values'].to(self.device, self.dtype)
        resized = []
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f'expected an HxWx3 uint8 RGB frame, got {frame.dtype} '
                                 f'{frame.shape}')
            # Views such as frame[..., ::-1] (BGR to RGB) have strides torch cannot wrap, and
            # torch warns on read-only arrays (np.frombuffer, decoded images).
            if not frame.flags['C_CONTIGUOUS'] or not frame.flags['WRITEABLE']:
                frame = np.array(frame, order='C')
            image = torch.from_numpy(frame).to(self.device, non_blocking=True)
            image = image.permute(2, 0, 1).unsqueeze(0)
            if tuple(image.shape[-2:]) != self.image_size:
                image = resize_like_pil(image, self.image_size, self.resize_mode)
            resized.append(image)
        if self.device.type == 'cpu':
            return self._normalize_on_cpu(resized)
        batch = torch.cat([image.float() for image in resized])
        return (batch * self._gain + self._offset).to(self.dtype)

    def _normalize_on_cpu(self, images):
        # numpy, single-threaded: torch's two-thread kernels on tensors this small wait for a
        # time slice whenever other processes keep the cores busy (12 ms per operation
        # measured on a loaded 2-core machine, against 0.1 ms on one thread).
        batch = np.empty((len(images), 3) + self.image_size, np.float32)
        for index, image in enumerate(images):
            np.multiply(image[0].numpy(), self._gain_array, out=batch[index])
            np.add(batch[index], self._offset_array, out=batch[index])
        return torch.from_numpy(batch).to(self.dtype)

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
            if len(self._prompt_cache) > 64:
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

    def _static_cache_for(self, batch_size, input_length, max_new_tokens):
        """Return a reset static KV cache for this batch shape, allocated on first use."""
        from transformers import EncoderDecoderCache, StaticCache

        # Rounding the decoder length up lets a slightly longer prompt or caption limit reuse
        # the same buffers, and the compiled step, instead of recompiling.
        if self.is_encoder_decoder:
            decoder_length = max_new_tokens + 1
            encoder_length = input_length
        else:
            decoder_length = input_length + max_new_tokens
            encoder_length = 0
        decoder_length = -(-decoder_length // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING
        key = (batch_size, decoder_length, encoder_length)
        cache = self._static_caches.pop(key, None)
        if cache is None:
            while len(self._static_caches) >= MAX_STATIC_CACHES:
                del self._static_caches[next(iter(self._static_caches))]
            text_config = self.model.config.text_config
            caches = [StaticCache(config=text_config, max_cache_len=decoder_length)]
            if self.is_encoder_decoder:
                # Cross-attention keys and values cover exactly the encoder's input.
                caches.append(StaticCache(config=text_config, max_cache_len=encoder_length))
            # Allocated now rather than by the first forward pass: tensors made inside a
            # compiled prefill would belong to its CUDA graph, and the next replay would
            # overwrite them.
            heads = (getattr(text_config, 'num_key_value_heads', None)
                     or text_config.num_attention_heads)
            head_size = (getattr(text_config, 'd_kv', None)
                         or getattr(text_config, 'head_dim', None)
                         or text_config.hidden_size // text_config.num_attention_heads)
            for part in caches:
                part.early_initialization(batch_size, heads, head_size,
                                          self.model.language_model.dtype, self.device)
            cache = EncoderDecoderCache(*caches) if self.is_encoder_decoder else caches[0]
        else:
            cache.reset()
        self._static_caches[key] = cache  # most recently used last
        return cache, decoder_length

    @torch.inference_mode()
    def caption(self, frames, prompt=None, max_new_tokens=None, **generate_kwargs):
        """
        Caption a batch of HxWx3 uint8 RGB frames in one ``generate`` call.

        ``prompt`` is one string for all frames or one per frame (None: the configured prompt).
        Decoding is greedy unless ``generate_kwargs`` say otherwise, so the same frame gives
        the same caption.
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
        if self.decode_loop and set(generate_kwargs) <= {'min_new_tokens'}:
            output = self._decode(pixel_values, input_ids, attention_mask, max_new_tokens,
                                  generate_kwargs.get('min_new_tokens') or 0)
            return self._texts(output)
        options = {
            'max_new_tokens': max_new_tokens,
            'do_sample': False, 'num_beams': self.config.num_beams,
        }
        options.update(generate_kwargs)
        if self.static_cache and 'past_key_values' not in options:
            if options['num_beams'] > 1:
                # Beam search reorders the cache out of place, so nothing is gained by reuse.
                options.setdefault('cache_implementation', 'static')
            elif 'cache_implementation' not in options:
                options['past_key_values'], _ = self._static_cache_for(
                    len(frames), input_ids.shape[1], options['max_new_tokens'])
        # generate() would compile its own step on a static cache; the decode loop is the
        # compiled path here.
        options.setdefault('disable_compile', True)
        output = self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
            **options)
        if not self.is_encoder_decoder:
            # Decoder-only generate returns the prompt too.
            output = output[:, input_ids.shape[1]:]
        return self._texts(output)

    def _texts(self, token_ids):
        texts = self.processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def _image_features(self, pixel_values):
        """Vision tower, Q-Former and projection: the image queries, as generate() makes them."""
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                device=image_embeds.device)
        query_output = model.qformer(
            query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
            return_dict=True).last_hidden_state
        return model.language_projection(query_output.to(image_embeds.dtype))

    def _decode(self, pixel_values, input_ids, attention_mask, max_new_tokens, min_new_tokens):
        """
        Greedy decoding on the static cache; returns the new token ids, padded after EOS.

        Before ``min_new_tokens`` tokens, end-of-sequence tokens are ruled out, as generate()
        does for its ``min_new_tokens``.

        ``_prefill`` runs the image encoder and the prompt and picks the first token; every
        later token comes from ``_decode_step``, whose shapes never change. With torch_compile
        each is one compiled graph (a CUDA graph on GPUs), replayed per call and per token.
        Tokens stay on the device, and the host asks whether all captions have ended only
        every EOS_CHECK_INTERVAL tokens.
        """
        batch_size, prompt_length = input_ids.shape
        cache, cache_length = self._static_cache_for(batch_size, prompt_length, max_new_tokens)
        eos_ban, eos_bias = self._eos_ban, self._no_eos_bias
        cuda_graphs = bool(self._compiled) and self.device.type == 'cuda'
        tokens, unfinished, context, positions = self._run(
            '_prefill', cache, pixel_values, input_ids, attention_mask, cache_length,
            eos_ban if min_new_tokens > 0 else eos_bias)
        if cuda_graphs:
            tokens, unfinished, positions = _copies(tokens, unfinished, positions)
            context = _copies(*context)
        output = torch.full((batch_size, max_new_tokens), self._pad_id, device=self.device)
        output[:, 0] = tokens
        check_interval = EOS_CHECK_INTERVAL if self.device.type == 'cuda' else 1
        length = 1
        while length < max_new_tokens:
            if (length >= min_new_tokens and (length - 1) % check_interval == 0
                    and not bool(unfinished.any())):
                break
            tokens, unfinished, positions = self._run(
                '_decode_step', cache, context, tokens, unfinished, positions,
                eos_ban if length < min_new_tokens else eos_bias)
            output[:, length] = tokens
            if cuda_graphs:
                tokens, unfinished, positions = _copies(tokens, unfinished, positions)
            length += 1
        return output[:, :length]

    def _run(self, name, *args):
        """Run a method compiled if it is; if it cannot be compiled here, say why and go eager."""
        compiled = self._compiled.get(name)
        if compiled is None:
            return getattr(self, name)(*args)
        if self.device.type == 'cuda':
            # A new replay: outputs of earlier replays may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: B902 - compilers fail in many ways, all handled alike
            # Compiling fails before the code runs, so the cache is as it was.
            LOGGER.error('compiling failed, decoding uncompiled from now on: %s',
                         _one_line(error))
            self._compiled = {}
            self.compile_decode = False
            return getattr(self, name)(*args)

    def _prefill(self, cache, pixel_values, input_ids, attention_mask, cache_length, eos_bias):
        """
        Image queries, prompt and the first new token; fills the cache for the decode steps.

        Returns the first tokens, which captions have not ended yet, what every decode step
        reads besides the cache (the attention mask; for T5 the encoder's output and mask) and
        the last positions (None for T5).
        """
        language_model = self.model.language_model
        batch_size, prompt_length = input_ids.shape
        # The image queries take the place of the query-token placeholders, which
        # _encode_prompts puts first in every row.
        text_embeds = self.model.get_input_embeddings()(input_ids[:, self.num_query_tokens:])
        image_features = self._image_features(pixel_values).to(text_embeds.dtype)
        embeds = torch.cat([image_features, text_embeds], dim=1)
        if self.is_encoder_decoder:
            encoder_states = language_model.get_encoder()(
                inputs_embeds=embeds, attention_mask=attention_mask,
                return_dict=True).last_hidden_state
            start = torch.full((batch_size, 1), self._decoder_start_id, device=self.device)
            logits = language_model(
                encoder_outputs=(encoder_states,), attention_mask=attention_mask,
                decoder_input_ids=start, past_key_values=cache, use_cache=True).logits
            context, positions = (encoder_states, attention_mask), None
        else:
            # The mask covers the whole cache: slots not written yet are hidden by causality.
            mask = torch.ones((batch_size, cache_length), dtype=attention_mask.dtype,
                              device=self.device)
            mask[:, :prompt_length] = attention_mask
            # Left padding: each row counts its positions from its own first real token.
            positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
            # Only the last position's scores pick a token: the output embedding, the
            # largest matrix, multiplies one row per caption instead of the whole prompt.
            logits = language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            context, positions = (mask,), positions[:, -1:]
        tokens = (logits[:, -1] + eos_bias).argmax(-1)
        unfinished = ~torch.isin(tokens, self._eos_ids)
        return tokens, unfinished, context, positions

    def _decode_step(self, cache, context, tokens, unfinished, positions, eos_bias):
        """Feed each caption's last token, pick the next one; finished captions get padding."""
        language_model = self.model.language_model
        if self.is_encoder_decoder:
            encoder_states, encoder_mask = context
            logits = language_model(
                encoder_outputs=(encoder_states,), attention_mask=encoder_mask,
                decoder_input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits
        else:
            positions = positions + 1
            logits = language_model(
                input_ids=tokens[:, None], attention_mask=context[0], position_ids=positions,
                past_key_values=cache, use_cache=True).logits
        tokens = torch.where(unfinished, (logits[:, -1] + eos_bias).argmax(-1), self._pad_id)
        unfinished = unfinished & ~torch.isin(tokens, self._eos_ids)
        return tokens, unfinished, positions
