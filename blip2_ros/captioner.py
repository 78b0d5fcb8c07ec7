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
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = 'Salesforce/blip2-opt-2.7b'
DEVICE_HELP = "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
# PIL resample codes used by Hugging Face image processors -> torch interpolation modes.
RESAMPLE_MODES = {2: 'bilinear', 3: 'bicubic'}


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
        if torch.cuda.is_bf16_supported():
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


class Blip2Captioner:
    """A loaded BLIP-2 checkpoint that captions batches of uint8 RGB frames."""

    def __init__(self, config=None):
        """Load the model, processor and optional LoRA adapter; raise ModelLoadError on failure."""
        from transformers import AutoConfig, Blip2ForConditionalGeneration, Blip2Processor

        self.config = config = config or CaptionerConfig()
        self.device = resolve_device(config.device)
        if config.cache not in ('dynamic', 'static'):
            raise ModelLoadError(f"unknown cache '{config.cache}': use dynamic or static")
        load_args = {'local_files_only': config.local_files_only}
        where = f"BLIP-2 model '{config.model}'"
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
            # Never trust_remote_code: a checkpoint must not run code of its own on a robot.
            model = Blip2ForConditionalGeneration.from_pretrained(
                config.model, dtype=self.dtype, use_safetensors=not config.allow_pickle,
                trust_remote_code=False, **load_args)
        except (OSError, ValueError, RuntimeError) as error:
            hint = ''
            if not config.allow_pickle and 'safetensors' in str(error).lower():
                hint = ' (the checkpoint has no safetensors weights; allow_pickle loads it)'
            raise ModelLoadError(f'cannot load {where}: {_one_line(error)}{hint}') from error
        if config.adapter:
            model = self._merge_adapter(model, config.adapter, load_args)
        try:
            self.model = model.to(self.device).eval()
        except torch.OutOfMemoryError as error:
            raise ModelLoadError(
                f'{where} does not fit in {self.device} memory as {self.dtype}: '
                'use a smaller model, dtype bfloat16/float16, or device cpu') from error
        tokenizer = self.processor.tokenizer
        # Decoder-only models continue the text where it ends, so pad on the left; encoders
        # read the whole prompt, so pad on the right.
        tokenizer.padding_side = 'right' if self.is_encoder_decoder else 'left'
        self.image_token_id = self.model.config.image_token_id
        self.num_query_tokens = self.model.config.num_query_tokens
        self._prompt_cache = {}
        self._set_up_preprocessing()
        if config.torch_compile:
            self.model.language_model.forward = torch.compile(
                self.model.language_model.forward, mode='reduce-overhead', fullgraph=False)

    @staticmethod
    def _merge_adapter(model, adapter, load_args):
        if not os.path.isdir(adapter):
            raise ModelLoadError(f"LoRA adapter folder '{adapter}' does not exist")
        try:
            from peft import PeftModel
        except ImportError as error:
            raise ModelLoadError(
                'a LoRA adapter was given but peft is not installed: pip install peft') from error
        try:
            model = PeftModel.from_pretrained(model, adapter, **load_args)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(
                f"cannot apply LoRA adapter '{adapter}': {_one_line(error)}") from error
        # Merged weights run exactly as fast as the base model.
        return model.merge_and_unload()

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
            image = torch.from_numpy(frame).to(self.device, non_blocking=True)
            image = image.permute(2, 0, 1).unsqueeze(0)
            if tuple(image.shape[-2:]) != self.image_size:
                image = self._resize(image)
            resized.append(image)
        batch = torch.cat(resized).float()
        return (batch * self._gain + self._offset).to(self.dtype)

    def _resize(self, image):
        if image.device.type == 'cpu':
            # torch's uint8 channels-last kernel matches PIL's integer resampling and is fast.
            image = image.contiguous(memory_format=torch.channels_last)
            return F.interpolate(image, size=self.image_size, mode=self.resize_mode,
                                 antialias=True, align_corners=False)
        resized = F.interpolate(image.float(), size=self.image_size, mode=self.resize_mode,
                                antialias=True, align_corners=False)
        return resized.round_().clamp_(0, 255)

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
        pixel_values = self.preprocess(frames)
        input_ids, attention_mask = self._encode_prompts(prompts)
        options = {
            'max_new_tokens': max_new_tokens or self.config.max_new_tokens,
            'do_sample': False, 'num_beams': self.config.num_beams,
        }
        if self.config.cache == 'static':
            options['cache_implementation'] = 'static'
        options.update(generate_kwargs)
        output = self.model.generate(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
            **options)
        if not self.is_encoder_decoder:
            # Decoder-only generate returns the prompt too.
            output = output[:, input_ids.shape[1]:]
        texts = self.processor.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.strip() for text in texts]
