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
The checkpoint loader: what a model or adapter path means, and what cannot be loaded.

A model is a local folder (``~`` expanded) or a Hugging Face hub id; this module alone decides
which, checks a folder's files before anything loads, and refuses weights that would leave
layers randomly initialised, a checkpoint that needs its own code unless trusted, pickle
weights unless allowed, and a tokenizer that does not fit its model. Every refusal is a
:class:`ModelLoadError` whose message is one line: what is there, what is missing, what to
do. Importing this module needs neither torch nor transformers, so the doctor uses its checks
where those are broken.
"""

import json
import logging
import os

LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = 'Salesforce/blip2-opt-2.7b'
# Written by training.train next to the model or adapter it saves: the prompt it trained with.
TRAINING_INFO_FILE = 'blip2_ros_training.json'
MAX_PROMPT_CHARS = 2000
DEVICE_HELP = "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
DTYPES = ('float32', 'float16', 'bfloat16')
SAVE_HINT = ('give the folder that save_pretrained wrote (config.json, model.safetensors, '
             'processor files) or a hub id such as ' + DEFAULT_MODEL)
# Weight files as save_pretrained names them: one file, or an index and the shards it lists.
WEIGHT_FILES = (('safetensors', 'model.safetensors', 'model.safetensors.index.json'),
                ('pickle', 'pytorch_model.bin', 'pytorch_model.bin.index.json'))
PROCESSOR_FILES = ('preprocessor_config.json', 'processor_config.json')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json')
# The auto_map keys that can name a checkpoint's own model class, in the order they are used.
REMOTE_MODEL_KEYS = ('AutoModelForImageTextToText', 'AutoModelForVision2Seq', 'AutoModel')
# How a user turns on the opt-in for a checkpoint's own code, in the node and every command.
TRUST_REMOTE_CODE_HINT = ('if you trust its source, turn on trust_remote_code (node: '
                          'trust_remote_code:=true; commands: --trust-remote-code)')


class ModelLoadError(RuntimeError):
    """A checkpoint, adapter, device or dtype that cannot be used; the message is one line."""


def one_line(error, limit=300):
    """Return an error (or any text) as one line of at most ``limit`` characters."""
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def resolve_device(device):
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' into a torch.device that exists on this machine."""
    import torch
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
    import torch
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
    return getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------
# What a model path means, and what a checkpoint folder holds


def looks_like_path(model):
    """Tell a name meant as a folder (absolute, ./, ~, a/b/c) from a hub id (owner/name)."""
    return (os.path.isabs(model) or model.startswith(('.', '~')) or model.count('/') > 1
            or os.sep != '/' and os.sep in model)


def model_location(model):
    """
    Return ``(location, kind)`` for a model name: the one place that decides what it means.

    ``location`` is the name with ``~`` expanded; ``kind`` is 'folder', 'file' (a path to
    something that is not a folder), 'missing' (a path that does not exist) or 'hub' (a hub id,
    not checked further here).
    """
    location = os.path.expanduser(model)
    if os.path.isdir(location):
        return location, 'folder'
    if os.path.exists(location):
        return location, 'file'
    return location, 'missing' if looks_like_path(model) else 'hub'


def weight_kind(files):
    """Return 'safetensors', 'pickle' or '' from the file names a checkpoint folder has."""
    for kind, single_name, index_name in WEIGHT_FILES:
        if single_name in files or index_name in files:
            return kind
    return ''


def lacks_processor_files(files):
    """Whether a checkpoint folder lacks its image processor or tokenizer files."""
    return not set(PROCESSOR_FILES) & files or not set(TOKENIZER_FILES) & files


def weight_problem(folder, files):
    """
    Return why the weights in a checkpoint folder cannot load, or '' when they look whole.

    The shards an index file lists must all be there, and every safetensors file must have a
    readable header: a truncated or damaged file fails there, and only the header is read.
    """
    from safetensors import safe_open, SafetensorError
    for _, single_name, index_name in WEIGHT_FILES:
        if single_name in files:
            names = [single_name]
        elif index_name in files:
            try:
                with open(os.path.join(folder, index_name), encoding='utf-8') as stream:
                    names = sorted(set(json.load(stream)['weight_map'].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                return f'its {index_name} cannot be read ({one_line(error, 160)})'
            missing = [name for name in names if name not in files]
            if missing:
                return (f'{len(missing)} of the {len(names)} weight files its {index_name} '
                        f'lists are missing ({", ".join(missing[:3])})')
        else:
            continue
        for name in names:
            if name.endswith('.safetensors'):
                try:
                    with safe_open(os.path.join(folder, name), framework='pt'):
                        pass
                except (OSError, SafetensorError) as error:
                    return f'its weight file {name} is damaged ({one_line(error, 160)})'
        return ''
    return ''


def contents_problem(folder, allow_pickle):
    """Return why a checkpoint folder's weights or processor files cannot load, or ''."""
    files = set(os.listdir(folder))
    weights = weight_kind(files)
    if not weights and lacks_processor_files(files):
        return (f'there are no weights and no processor files in {folder} (expected '
                'model.safetensors, preprocessor_config.json and tokenizer files): save the '
                'model and its Blip2Processor there with save_pretrained')
    if not weights:
        return (f'there are no weights in {folder} (expected model.safetensors, or '
                'model.safetensors.index.json and its shards): download or save the whole '
                'checkpoint')
    problem = weight_problem(folder, files)
    if problem:
        return f'{problem}: download or save the checkpoint again'
    if weights == 'pickle' and not allow_pickle:
        return ('it has only pickle weights (pytorch_model.bin), which can run code when '
                'loaded: re-save it as safetensors, or set allow_pickle if you trust its source')
    if lacks_processor_files(files):
        return (f'{folder} lacks its processor files (preprocessor_config.json, '
                'tokenizer.json, tokenizer_config.json): save the Blip2Processor next to the '
                'model')
    return ''


def config_problem(config_dict, trust_remote_code=False):
    """
    Return why a checkpoint's config.json rules the checkpoint out, or ''.

    A config that names code of its own (``auto_map``) is refused unless ``trust_remote_code``.
    """
    if config_dict.get('auto_map') and not trust_remote_code:
        # A checkpoint's code runs with the robot's permissions: only on the user's word.
        return ('its config.json names code of its own (auto_map), which runs only when '
                f'trusted: {TRUST_REMOTE_CODE_HINT}, or use a checkpoint that the Blip2 '
                'classes of transformers load as they are')
    model_type = config_dict.get('model_type') or 'unknown'
    if model_type != 'blip-2':
        return (f"its config.json says model_type '{model_type}', so it is not BLIP-2: name a "
                f'BLIP-2 checkpoint such as {DEFAULT_MODEL}')
    return ''


def tokenizer_problem(tokenizer, text_config):
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


# ---------------------------------------------------------------------------------------------
# Prompts saved with a checkpoint


def training_prompt(*folders, default=''):
    """
    Return the prompt training.train saved in the first of ``folders`` that has one.

    A model learns to continue the prompt it was trained with, so that is the prompt to
    caption with. Hub ids and folders without the file are skipped; ``default`` if none has it.
    """
    for folder in folders:
        path = os.path.join(os.path.expanduser(folder or ''), TRAINING_INFO_FILE)
        if not folder or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding='utf-8') as stream:
                prompt = json.load(stream).get('prompt', '')
        except (OSError, ValueError, AttributeError) as error:
            raise ModelLoadError(f'cannot read the training prompt in {path}: '
                                 f'{one_line(error)}') from error
        if not isinstance(prompt, str):
            raise ModelLoadError(f'the training prompt in {path} is not text: {prompt!r}')
        problem = prompt_problem(prompt)
        if problem:
            raise ModelLoadError(f'the training prompt in {path} cannot be used: {problem}')
        return prompt
    return default


def adapter_training_prompt(adapter):
    """
    Return the prompt a LoRA adapter was trained with, or None if its folder does not say.

    For naming the weights in use next to the base model; a file that cannot be read counts as
    saying nothing (loading reports it where the prompt is used).
    """
    if not adapter:
        return None
    try:
        return training_prompt(adapter, default=None)
    except ModelLoadError:
        return None


def prompt_problem(prompt):
    """Return why ``prompt`` cannot be captioned with, or None if it can."""
    if '<image>' in prompt:
        # The processor puts the image's query tokens in; one more breaks every batch.
        return 'prompt must not contain the <image> token'
    if len(prompt) > MAX_PROMPT_CHARS:
        return f'prompt is longer than {MAX_PROMPT_CHARS} characters'
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def _hub_id_problem(model, local_files_only):
    """Return why a hub id cannot be loaded here, judged before any download, or ''."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(model)
    except HFValidationError:
        return ('no such folder, and not a valid hub id; give an existing '
                f'checkpoint folder or a hub id such as {DEFAULT_MODEL}')
    if local_files_only:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model, 'config.json'), str):
            return ('it is not in the local model cache and local_files_only is set; download '
                    'it once on a machine with network access or give a folder')
    return ''


def locate_checkpoint(model, local_files_only, where):
    """Return where from_pretrained should load ``model`` from, and whether it is a folder."""
    location, kind = model_location(model)
    if kind == 'folder':
        problem = ('' if os.path.isfile(os.path.join(location, 'config.json'))
                   else f'there is no config.json in {location}: {SAVE_HINT}')
    elif kind == 'file':
        problem = f'{location} is a file, not a checkpoint folder; {SAVE_HINT}'
    elif kind == 'missing':
        problem = f'no such folder: {location}; {SAVE_HINT}'
    else:
        problem = _hub_id_problem(model, local_files_only)
    if problem:
        raise ModelLoadError(f'cannot load {where}: {problem}')
    return location, kind == 'folder'


def read_blip2_config(location, local_files_only, where, trust_remote_code=False):
    """
    Read a checkpoint's config, refusing one that is not BLIP-2 or that needs its own code.

    With ``trust_remote_code`` a config class of the checkpoint's own runs, and must build on
    transformers' Blip2Config.
    """
    from transformers import AutoConfig, Blip2Config, PretrainedConfig
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(
            location, local_files_only=local_files_only)
        problem = config_problem(config_dict, trust_remote_code)
        if problem:
            raise ModelLoadError(f'cannot load {where}: {problem}')
        config = AutoConfig.from_pretrained(location, local_files_only=local_files_only,
                                            trust_remote_code=trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError, AttributeError, SyntaxError) as error:
        raise ModelLoadError(f'cannot load {where}: {one_line(error)}') from error
    if not isinstance(config, Blip2Config):
        raise ModelLoadError(f'cannot load {where}: its own code makes a '
                             f'{type(config).__name__}, which does not build on Blip2Config')
    return config


def blip2_model_class(location, model_config, local_files_only, where):
    """
    Return the class that loads a checkpoint: Blip2ForConditionalGeneration or its own.

    A checkpoint's own class (named in ``auto_map``, read only once trusted) must build on
    Blip2ForConditionalGeneration: the preprocessing, the decode loop and the OpenVINO
    conversion rely on its layers.
    """
    from transformers import Blip2ForConditionalGeneration
    auto_map = getattr(model_config, 'auto_map', None) or {}
    key = next((key for key in REMOTE_MODEL_KEYS if key in auto_map), None)
    if key is None:
        return Blip2ForConditionalGeneration
    import transformers.models.auto
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    reference = auto_map[key]
    try:
        model_class = get_class_from_dynamic_module(reference, location,
                                                    local_files_only=local_files_only)
    except Exception as error:  # its code may raise anything while it is imported
        raise ModelLoadError(f'cannot load {where}: its own code ({reference}) does not load: '
                             f'{one_line(error, 200)}') from error
    if not (isinstance(model_class, type)
            and issubclass(model_class, Blip2ForConditionalGeneration)):
        name = getattr(model_class, '__name__', repr(model_class))
        raise ModelLoadError(f'cannot load {where}: its own code makes {name}, which does not '
                             'build on Blip2ForConditionalGeneration, so it cannot caption here')
    # As transformers' Auto classes do: save_pretrained then copies the code beside the
    # weights, so a model trained or merged from this one loads the same way.
    model_class.register_for_auto_class(
        key if hasattr(transformers.models.auto, key) else REMOTE_MODEL_KEYS[0])
    LOGGER.warning('%s runs code of its own: %s (trust_remote_code is set)', where, reference)
    return model_class


def _missing_weights_problem(loading_info):
    """Return why from_pretrained's loading report means random weights, or ''."""
    missing = sorted(loading_info.get('missing_keys') or ())
    mismatched = sorted(str(key[0] if isinstance(key, tuple) else key)
                        for key in loading_info.get('mismatched_keys') or ())
    if not missing and not mismatched:
        return ''
    first = (missing or mismatched)[0]
    return (f'its weights are incomplete: {len(missing)} weights are missing and '
            f'{len(mismatched)} have the wrong shape (first: {first}), so those layers would '
            'be random; download or save the whole checkpoint again')


def load_weights(location, dtype, allow_pickle, local_files_only, where, four_bit_on=None,
                 model_class=None):
    """
    Load the BLIP-2 weights, refusing a checkpoint that would leave any layer random.

    ``four_bit_on`` (a CUDA device) loads the weights as bitsandbytes NF4 onto that device.
    ``model_class`` is the checkpoint's own class (see ``blip2_model_class``), if trusted.
    """
    from safetensors import SafetensorError
    from transformers import Blip2ForConditionalGeneration
    model_class = model_class or Blip2ForConditionalGeneration
    options = {}
    if four_bit_on is not None:
        from transformers import BitsAndBytesConfig
        options = {'device_map': {'': four_bit_on.index or 0},
                   'quantization_config': BitsAndBytesConfig(
                       load_in_4bit=True, bnb_4bit_quant_type='nf4',
                       bnb_4bit_compute_dtype=dtype)}
    try:
        # A checkpoint's own code has run only if trusted (blip2_model_class); from here on
        # nothing else of it runs. allow_pickle only widens the choice: safetensors still win
        # where both exist.
        model, loading_info = model_class.from_pretrained(
            location, dtype=dtype, use_safetensors=None if allow_pickle else True,
            trust_remote_code=False, local_files_only=local_files_only,
            output_loading_info=True, **options)
    except SafetensorError as error:
        raise ModelLoadError(
            f'cannot load {where}: a weight file is damaged ({one_line(error)}); download '
            'or save the checkpoint again') from error
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        hint = ''
        if not allow_pickle and 'safetensors' in str(error).lower():
            hint = ' (the checkpoint may have only pickle weights; allow_pickle loads them)'
        raise ModelLoadError(f'cannot load {where}: {one_line(error)}{hint}') from error
    problem = _missing_weights_problem(loading_info)
    if problem:
        raise ModelLoadError(f'cannot load {where}: {problem}')
    unexpected = sorted(loading_info.get('unexpected_keys') or ())
    if unexpected:
        LOGGER.warning('%s has %d weights that no layer uses (first: %s); they are ignored',
                       where, len(unexpected), unexpected[0])
    return model


QUANTIZATIONS = ('none', 'int8', 'int4')


def _import_torchao_quietly():
    """
    Import torchao.quantization without the warnings a user cannot act on.

    Its CUDA-only extensions log one warning each on a CPU-only torch, and registering its
    enums with torch's pytree logs a deprecation notice each.
    """
    loggers = [logging.getLogger(name) for name in ('torchao', 'torch.utils._pytree')]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return torchao.quantization


def quantization_problem(quantization, device, has_adapter=False):
    """Return why weight-only ``quantization`` cannot work on ``device``, or None."""
    if quantization not in QUANTIZATIONS:
        return f"unknown quantization '{quantization}': use {', '.join(QUANTIZATIONS)}"
    if quantization == 'int8':
        try:
            _import_torchao_quietly()
        except ImportError:
            return 'quantization int8 needs the torchao package: pip install torchao'
    if quantization == 'int4':
        if device.type != 'cuda':
            return ('quantization int4 needs a CUDA GPU (bitsandbytes NF4); on a CPU use '
                    'int8, which torchao runs there')
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return 'quantization int4 needs the bitsandbytes package: pip install bitsandbytes'
        if has_adapter:
            return ('quantization int4 cannot merge an adapter into 4-bit weights: merge it '
                    'first (python -m training.export_merged) and load the merged folder')
    return None


def quantize(model, quantization, dtype):
    """
    Make the weights of ``model``'s Linear layers 8-bit (torchao, weight only) in place.

    int4 happens while loading instead (bitsandbytes NF4, see ``load_weights``).
    """
    if quantization != 'int8':
        return model
    quantization_api = _import_torchao_quietly()
    quantization_api.quantize_(model, quantization_api.Int8WeightOnlyConfig())
    return model


def load_checkpoint(config, device):
    """
    Load the model and processor ``config`` names, adapter merged, on ``device``.

    Returns ``(model, processor, dtype)``; raises ModelLoadError with a one-line message for
    anything that cannot be loaded. What is cheap to check is checked first: the folder's
    files, the config and the tokenizer before the weights, which take minutes to load for a
    full-size model.
    """
    import torch
    from transformers import Blip2Processor
    where = f"BLIP-2 model '{config.model}'"
    location, is_folder = locate_checkpoint(config.model, config.local_files_only, where)
    trust_remote_code = getattr(config, 'trust_remote_code', False)
    model_config = read_blip2_config(location, config.local_files_only, where, trust_remote_code)
    problem = contents_problem(location, config.allow_pickle) if is_folder else ''
    if problem:
        raise ModelLoadError(f'cannot load {where}: {problem}')
    dtype = resolve_dtype(config.dtype, device, bool(model_config.text_config.is_encoder_decoder))
    try:
        processor = Blip2Processor.from_pretrained(location,
                                                   local_files_only=config.local_files_only)
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ModelLoadError(f'cannot load {where}: {one_line(error)}') from error
    problem = tokenizer_problem(processor.tokenizer, model_config.text_config)
    if problem:
        raise ModelLoadError(f'cannot load {where}: {problem}')
    quantization = getattr(config, 'quantization', 'none')
    problem = quantization_problem(quantization, device, bool(config.adapter))
    if problem:
        raise ModelLoadError(problem)
    four_bit = quantization == 'int4'
    model_class = blip2_model_class(location, model_config, config.local_files_only, where)
    model = load_weights(location, dtype, config.allow_pickle, config.local_files_only, where,
                         four_bit_on=device if four_bit else None, model_class=model_class)
    if config.adapter:
        model = merge_adapter(model, config.adapter, config.allow_pickle)
    try:
        if not four_bit:  # 4-bit weights were loaded onto the device and cannot move
            model = quantize(model.to(device), quantization, dtype)
        return model.eval(), processor, dtype
    except torch.OutOfMemoryError as error:
        raise ModelLoadError(
            f'{where} does not fit in {device} memory as {dtype}: '
            'use a smaller model, dtype bfloat16/float16, or device cpu') from error


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def _adapter_covers_whole_model(adapter_weights, model):
    """Tell a LoRA saved on the whole BLIP-2 from one saved on its language model alone."""
    top_level = {name for name, _ in model.named_children()} | {'query_tokens'}
    for key in adapter_weights:
        if key.startswith('base_model.model.') and key.split('.')[2] in top_level:
            return True
    return False


def _check_adapter_folder(adapter, allow_pickle):
    """Refuse an adapter folder that is absent, empty or pickle-only (unless allowed)."""
    if os.path.isfile(adapter):
        raise ModelLoadError(f"LoRA adapter '{adapter}' is a file, not a folder; give the "
                             'folder that save_pretrained wrote')
    if not os.path.isdir(adapter):
        raise ModelLoadError(f"LoRA adapter folder '{adapter}' does not exist")
    if os.path.isfile(os.path.join(adapter, 'adapter_model.safetensors')):
        return
    if not os.path.isfile(os.path.join(adapter, 'adapter_model.bin')):
        raise ModelLoadError(
            f"LoRA adapter folder '{adapter}' holds no adapter_model.safetensors; "
            'give the folder that save_pretrained wrote')
    if not allow_pickle:
        raise ModelLoadError(
            f"LoRA adapter '{adapter}' has only pickle weights (adapter_model.bin); "
            're-save it as safetensors, or set allow_pickle if you trust its source')


def _peft_model(model, adapter):
    """Wrap the part of ``model`` the adapter was trained on; return it and the load result."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError
    try:
        peft_config = PeftConfig.from_pretrained(adapter)
        if peft_config.is_prompt_learning:
            raise ModelLoadError(
                f"adapter '{adapter}' is a {peft_config.peft_type} prompt-learning adapter, "
                'which cannot be merged; train a LoRA adapter')
        adapter_weights = load_peft_weights(adapter, device='cpu')
        whole_model = _adapter_covers_whole_model(adapter_weights, model)
        peft_model = PeftModel(model if whole_model else model.language_model, peft_config)
        return peft_model, whole_model, set_peft_model_state_dict(peft_model, adapter_weights)
    except ModelLoadError:
        raise
    except SafetensorError as error:
        raise ModelLoadError(
            f"LoRA adapter '{adapter}' has a damaged weight file ({one_line(error)}); "
            'save or copy the adapter again') from error
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ModelLoadError(
            f"cannot apply LoRA adapter '{adapter}': {one_line(error)}") from error


def merge_adapter(model, adapter, allow_pickle):
    """
    Apply a LoRA adapter folder (``~`` expanded) to a loaded BLIP-2, merged into the weights.

    Both forms the training tools write are accepted: LoRA on the whole
    Blip2ForConditionalGeneration (keys under ``language_model.``) and LoRA on its language
    model alone. An adapter whose weights do not all land on a layer is refused, since peft
    would only warn and run the base model.
    """
    adapter = os.path.expanduser(adapter)
    _check_adapter_folder(adapter, allow_pickle)
    try:
        import peft  # noqa: F401 - only to say what to install
    except ImportError as error:
        raise ModelLoadError(
            'a LoRA adapter was given but peft is not installed: pip install peft') from error
    peft_model, whole_model, load_result = _peft_model(model, adapter)
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
