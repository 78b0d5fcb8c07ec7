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
Benchmark 4 and 5: BLIP-2 at its real size on a GPU, captioning and training throughput.

The blip2-opt-2.7b and blip2-flan-t5-xl architectures are built here from their published
configuration values with random weights (nothing is downloaded), with a BlipImageProcessor
at 224 px and a word-level tokenizer of the right vocabulary size made locally. Every caption
is forced to 30 new tokens (min_new_tokens = max_new_tokens = 30), so random weights cost
exactly what trained ones do.

Per model and batch size (1, 4, 8): latency, captions per second and peak GPU memory of

* ``naive``: what a first script does: float32, one frame at a time, PIL preprocessing
  through the processor, dynamic KV cache, no compile (batch N = N calls);
* ``bf16 eager``: Blip2Captioner in bfloat16, dynamic cache (batch 1 only, for reference);
* ``generate compiled`` (opt, batch 1): the static KV cache and transformers' generate()
  compiling its own decode step into a CUDA graph; the loop around that step, with its logits
  processors and a host synchronisation per token, is transformers'. The fast path before the
  project had a decode loop of its own, kept as the baseline for that loop;
* ``loop eager`` (opt, batch 1): the captioner's decode loop on the static cache, uncompiled;
* ``fast``: Blip2Captioner in bfloat16 with ``torch_compile``: static KV cache reused across
  calls, GPU preprocessing, and the captioner's decode loop replaying one compiled step (a
  CUDA graph) per token, tokens kept on the GPU. Its first call per batch size compiles; the
  time is reported;
* ``fast, cuBLAS matmuls`` (GPU, batch 1): the same, with the language model's one-row
  products left to cuBLAS instead of the captioner's OneRowLinear reductions.

Against the memory-bandwidth floor: the bytes a caption must read at least (vision tower,
Q-Former and projection once, the language model's decode weights and KV cache once per new
token) over the GPU's memory bandwidth (3.35 TB/s for an H100 SXM, 4.8 TB/s for an H200, else
a device-to-device copy measured here). Goals: opt-2.7b at batch 1 within 2x the floor, batch 4
within 1.3x of batch 1's latency. With ``--training``: samples per second and peak memory of
the ``qformer`` and ``lora`` methods of training/train.py on the opt-2.7b architecture, 224 px,
bfloat16 autocast.

Everything runs in one process under a time budget (``--budget-s``): sections that no longer
fit are skipped and listed. The results go to stdout as tables and JSON, and to
``$OUT/bench_gpu.json`` when OUT is set (rewritten after every section, so a run cut short
still leaves what it measured). ``--quick`` builds tiny models of the same structure instead,
so the whole script can be checked on a CPU.
"""

import gc
import json
import os
import threading
import time
import traceback

import common

NEW_TOKENS = 30
BATCH_SIZES = (1, 4, 8)
GOAL_FLOOR_RATIO = 2.0
GOAL_BATCH4_RATIO = 1.3
# Spec memory bandwidth, bytes/s, by GPU name.
SPEC_BANDWIDTH = (('H200', 4.8e12, 'H200 spec'), ('H100 80GB HBM3', 3.35e12, 'H100 SXM spec'),
                  ('H100 SXM', 3.35e12, 'H100 SXM spec'))
# Rough seconds each section takes on an H100 or H200, to decide what still fits in the
# budget (a compile: about 210 s on the H200 with coordinate descent tuning on every graph).
ESTIMATE_S = {'build': 25, 'naive': 20, 'eager': 15, 'compile': 200, 'batch': 60,
              'training': 60}


# ---------------------------------------------------------------------------------------------
# Published configurations


def vision_config(quick):
    """ViT-g/14 of BLIP-2 (EVA-CLIP), as published; tiny with ``quick``."""
    from transformers import Blip2VisionConfig
    if quick:
        return Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=224, patch_size=32)
    return Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                             num_attention_heads=16, image_size=224, patch_size=14,
                             hidden_act='gelu', layer_norm_eps=1e-6, qkv_bias=True)


def qformer_config(quick):
    """BLIP-2's Q-Former, as published; tiny with ``quick``."""
    from transformers import Blip2QFormerConfig
    if quick:
        return Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, cross_attention_frequency=2,
                                  encoder_hidden_size=64)
    return Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, cross_attention_frequency=2,
                              encoder_hidden_size=1408)


def text_config(language_model, quick, tokenizer):
    """OPT-2.7b or Flan-T5-XL as published (tiny with ``quick``), token ids from ``tokenizer``."""
    from transformers import OPTConfig, T5Config
    ids = {'pad_token_id': tokenizer.pad_token_id, 'eos_token_id': tokenizer.eos_token_id}
    if language_model == 'opt':
        size = ({'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4,
                 'ffn_dim': 128, 'word_embed_proj_dim': 64} if quick else
                {'hidden_size': 2560, 'num_hidden_layers': 32, 'num_attention_heads': 32,
                 'ffn_dim': 10240, 'word_embed_proj_dim': 2560})
        return OPTConfig(vocab_size=vocab_size(language_model, quick),
                         max_position_embeddings=2048, do_layer_norm_before=True,
                         activation_function='relu', enable_bias=True,
                         bos_token_id=tokenizer.eos_token_id, **size, **ids)
    size = ({'d_model': 64, 'd_kv': 16, 'd_ff': 128, 'num_layers': 2, 'num_decoder_layers': 2,
             'num_heads': 4} if quick else
            {'d_model': 2048, 'd_kv': 64, 'd_ff': 5120, 'num_layers': 24,
             'num_decoder_layers': 24, 'num_heads': 32})
    return T5Config(vocab_size=vocab_size(language_model, quick),
                    feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    decoder_start_token_id=tokenizer.pad_token_id, **size, **ids)


def vocab_size(language_model, quick):
    """Vocabulary of the published language model (OPT pads 50265 to 50272)."""
    if quick:
        return 512
    return 50272 if language_model == 'opt' else 32128


def build_processor(language_model, quick, pil=False):
    """Build a 224 px BlipImageProcessor and a word-level tokenizer of the model's vocabulary."""
    from training.tiny_blip2 import BASE_WORDS, build_tokenizer
    from transformers import Blip2Processor

    image_processor_class = pil_image_processor_class() if pil else None
    if image_processor_class is None:
        from transformers import BlipImageProcessor as image_processor_class
    # Published settings: 224x224, bicubic, CLIP mean and std (the class defaults).
    image_processor = image_processor_class(size={'height': 224, 'width': 224}, do_resize=True,
                                            do_rescale=True, do_normalize=True,
                                            do_convert_rgb=True)
    fillers = vocab_size(language_model, quick) - 5 - len(set(BASE_WORDS))
    tokenizer = build_tokenizer([f'w{index}' for index in range(fillers)], language_model)
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                          num_query_tokens=num_query_tokens(quick))


def pil_image_processor_class():
    """Return the PIL-backed BLIP image processor of this transformers version, or None."""
    try:
        from transformers import BlipImageProcessorPil
        return BlipImageProcessorPil
    except ImportError:
        try:
            from transformers.models.blip.image_processing_pil_blip import (
                BlipImageProcessorPil)
            return BlipImageProcessorPil
        except ImportError:
            return None  # older transformers: BlipImageProcessor itself uses PIL


def num_query_tokens(quick):
    """Query tokens of the published checkpoints (fewer in the tiny models)."""
    return 8 if quick else 32


def build_model(language_model, quick, processor, device):
    """Build the BLIP-2 in float32 with random weights directly on ``device``."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=vision_config(quick).to_dict(),
        qformer_config=qformer_config(quick).to_dict(),
        text_config=text_config(language_model, quick, tokenizer).to_dict(),
        num_query_tokens=num_query_tokens(quick),
        image_token_index=tokenizer.convert_tokens_to_ids('<image>'))
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def to_bfloat16(model):
    """Cast to bfloat16 the way from_pretrained(dtype=bfloat16) loads BLIP-2."""
    import torch
    model.to(torch.bfloat16)
    # For bfloat16, from_pretrained upcasts only the "strict" float32 modules
    # (_keep_in_fp32_modules applies to float16 alone).
    keep = set(getattr(model, '_keep_in_fp32_modules_strict', None) or ())
    if keep:
        for name, module in model.named_modules():
            if keep & set(name.split('.')):
                module.float()
        for name, parameter in model.named_parameters():
            if keep & set(name.split('.')):
                parameter.data = parameter.data.float()
    return model


# ---------------------------------------------------------------------------------------------
# Bytes, bandwidth, floor


def parameter_bytes(module):
    """Bytes of a module's parameters (shared ones counted once)."""
    seen, total = set(), 0
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel() * parameter.element_size()
    return total


def decode_step_bytes(model):
    """Weight bytes one decode step reads: the decoder and the output projection."""
    language_model = model.language_model
    if not model.config.text_config.is_encoder_decoder:
        # OPT: every layer, and the (tied) embedding matrix as the output projection.
        return parameter_bytes(language_model)
    decoder = parameter_bytes(language_model.decoder)
    shared = parameter_bytes(language_model.decoder.embed_tokens)
    return decoder - shared + parameter_bytes(language_model.lm_head)


def once_bytes(model):
    """Weight bytes read once per caption: vision tower, Q-Former, projection (T5 encoder)."""
    total = (parameter_bytes(model.vision_model) + parameter_bytes(model.qformer)
             + parameter_bytes(model.language_projection) + model.query_tokens.numel() * 4)
    if model.config.text_config.is_encoder_decoder:
        total += parameter_bytes(model.language_model.encoder)
    return total


def kv_bytes_per_step(model, batch, prompt_length):
    """Average KV-cache bytes one decode step reads (keys and values of every layer)."""
    text = model.config.text_config
    if text.is_encoder_decoder:
        layers, width = text.num_decoder_layers, text.num_heads * text.d_kv
        # Self-attention over the tokens so far plus cross-attention over the encoder input.
        positions = NEW_TOKENS / 2 + prompt_length
    else:
        layers, width = text.num_hidden_layers, text.hidden_size
        positions = prompt_length + NEW_TOKENS / 2
    return 2 * layers * width * positions * batch * 2  # bf16


def memory_bandwidth(device):
    """Return (bytes/s used for the floor, its source, measured copy bytes/s)."""
    import torch
    size = (1 << 30) if device.type == 'cuda' else (1 << 27)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    repeats = 10
    if device.type == 'cuda':
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    measured = 2 * size * repeats / (time.perf_counter() - started)  # read + write
    del source, target
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, value, label in SPEC_BANDWIDTH:
            if key in name:
                return value, label, measured
    return measured, 'measured device-to-device copy', measured


# ---------------------------------------------------------------------------------------------
# Timing


class Budget:
    """Wall-clock budget of the whole run; sections ask before they start."""

    def __init__(self, seconds):
        """Start the clock."""
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self):
        """Seconds left."""
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, section):
        """Whether a section of the given kind (ESTIMATE_S key) still fits."""
        return self.left() >= ESTIMATE_S[section]


def synchronize(device):
    """Wait for the device to finish its queued work."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak(device):
    """Start a new peak-memory window."""
    import torch
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    """Peak allocated device memory since the last reset, GiB (None on CPU)."""
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def time_caption(call, device, repeats, warmup):
    """Run ``call`` ``warmup`` then ``repeats`` times; return (first call s, timed ms list)."""
    started = time.perf_counter()
    call()
    synchronize(device)
    first_s = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000.0)
    return first_s, times


# ---------------------------------------------------------------------------------------------
# The run


class Run:
    """Holds the results, writes them after every section, enforces the budget."""

    def __init__(self, args, device):
        """Set up the result record."""
        self.args = args
        self.device = device
        self.budget = Budget(args.budget_s)
        self.results = {
            'benchmark': 'gpu', 'quick': args.quick, 'machine': common.machine_info(),
            'device': str(device), 'new_tokens': NEW_TOKENS, 'budget_s': args.budget_s,
            'models': {}, 'training': {}, 'preprocess': [], 'skipped': [], 'errors': [],
            'timeline': [], 'goals': [],
        }
        self.lock = threading.Lock()
        self.out_path = (os.path.join(os.environ['OUT'], 'bench_gpu.json')
                         if os.environ.get('OUT') else None)

    def log(self, text):
        """Print a progress line with the elapsed time."""
        elapsed = time.monotonic() - self.budget.started
        line = f'[{elapsed:6.1f} s] {text}'
        print(line, flush=True)
        with self.lock:
            self.results['timeline'].append(line)

    def save(self):
        """Write the results so far to $OUT/bench_gpu.json."""
        if not self.out_path:
            return
        with self.lock:
            text = json.dumps(self.results, indent=2, default=str)
        os.makedirs(os.path.dirname(self.out_path), exist_ok=True)
        with open(self.out_path, 'w') as stream:
            stream.write(text + '\n')

    def section(self, kind, name, function, *args, **kwargs):
        """Run one section if the budget allows; record a skip or an error instead of dying."""
        if not self.budget.allows(kind):
            self.log(f'skipped {name}: {self.budget.left():.0f} s left, needs about '
                     f'{ESTIMATE_S[kind]} s')
            self.results['skipped'].append(name)
            return None
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: B902 - one failed section must not lose the others
            self.log(f'ERROR in {name}: {type(error).__name__}: {error}')
            self.results['errors'].append({'section': name, 'error': f'{error}',
                                           'traceback': traceback.format_exc()[-3000:]})
            return None
        finally:
            self.save()


def frames_for(batch):
    """Camera-like 640x480 frames, a different one per batch slot."""
    from bench_preprocess import camera_like_frame
    base = camera_like_frame(480, 640)
    return [((base.astype('int16') + 37 * index) % 256).astype('uint8') for index in range(batch)]


def measure_naive(run, model, pil_processor, entry, repeats):
    """float32, one frame at a time, PIL preprocessing, dynamic cache, no compile."""
    from PIL import Image
    import torch

    frame = Image.fromarray(frames_for(1)[0])
    device = run.device

    @torch.inference_mode()
    def call():
        inputs = pil_processor(images=frame, text='', return_tensors='pt').to(device)
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, disable_compile=True)

    reset_peak(device)
    first_s, times = time_caption(call, device, repeats, warmup=1)
    single = common.summary(times)
    peak = peak_gib(device)
    for batch in BATCH_SIZES:
        latency = single['p50'] * batch  # one frame after the other
        entry['rows'].append({'variant': 'naive fp32', 'batch': batch,
                              'latency_ms_p50': latency, 'captions_per_s': 1000.0 / single['p50'],
                              'peak_gib': peak, 'first_call_s': first_s,
                              'note': 'one frame at a time' if batch > 1 else ''})
    run.log(f"naive fp32 batch 1: {single['p50']:.1f} ms p50")


def cudagraph_skips():
    """Count the compiled graphs torch ran without a CUDA graph so far (it warns why)."""
    from torch._dynamo.utils import counters
    return counters['inductor']['cudagraph_skips']


def measure_captioner(run, captioner, entry, variant, batches, repeats, warmup,
                      **generate_options):
    """Time Blip2Captioner.caption for each batch size."""
    device = run.device
    for batch in batches:
        if variant in ('bf16 eager', 'loop eager'):
            kind = 'eager'
        else:
            kind = 'batch' if entry.get(f'compiled_{variant}') else 'compile'
        if not run.budget.allows(kind):
            run.log(f'skipped {variant} batch {batch}: budget')
            run.results['skipped'].append(f"{entry['name']} {variant} batch {batch}")
            continue
        frames = frames_for(batch)

        def call(frames=frames):
            return captioner.caption(frames, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, **generate_options)

        reset_peak(device)
        skips = cudagraph_skips()
        first_s, times = time_caption(call, device, repeats, warmup)
        entry[f'compiled_{variant}'] = True
        timing = common.summary(times)
        row = {'variant': variant, 'batch': batch, 'latency_ms_p50': timing['p50'],
               'latency_ms_min': timing['min'], 'captions_per_s': batch * 1000.0 / timing['p50'],
               'peak_gib': peak_gib(device), 'first_call_s': first_s, 'timing': timing,
               'cudagraph_skips': cudagraph_skips() - skips}
        if variant != 'bf16 eager':
            # Everything but the decode loop: preprocessing, vision, Q-Former, prefill.
            one = common.time_calls(
                lambda frames=frames: captioner.caption(frames, max_new_tokens=1,
                                                        **generate_options),
                5, warmup=2, synchronize=lambda: synchronize(device))
            row['one_token_ms'] = common.summary(one)['p50']
            row['decode_ms_per_token'] = (timing['p50'] - row['one_token_ms']) / (NEW_TOKENS - 1)
        # The floor now, not only at the end: a run cut short still gets its verdict.
        add_floor(row, entry, run.results['bandwidth']['floor_bytes_per_s'],
                  prompt_length_of(captioner), captioner.model)
        entry['rows'].append(row)
        run.log(f"{entry['name']} {variant} batch {batch}: {timing['p50']:.1f} ms p50 "
                f'(first call {first_s:.1f} s'
                + (f", {row['cudagraph_skips']} CUDA graph(s) skipped: see torch's warning)"
                   if row['cudagraph_skips'] else ')'))
        run.save()


def prompt_length_of(captioner):
    """Return the token count of the benchmark's (empty) prompt with its image tokens."""
    return captioner._encode_prompts([''])[0].shape[1]


def add_floor(row, entry, bandwidth, prompt_length, model):
    """Attach the bandwidth floor of the row's caption and its ratios against it."""
    batch = row['batch']
    step = entry['decode_step_bytes'] + kv_bytes_per_step(model, batch, prompt_length)
    row['floor_ms'] = (entry['once_bytes'] + NEW_TOKENS * step) / bandwidth * 1000.0
    row['vs_floor'] = row['latency_ms_p50'] / row['floor_ms']
    if 'decode_ms_per_token' in row:
        row['decode_vs_floor'] = row['decode_ms_per_token'] / (step / bandwidth * 1000.0)


def add_floor_and_ratios(entry, bandwidth, prompt_length, model):
    """Attach the bandwidth floor and the ratios against it and against naive to every row."""
    naive = {row['batch']: row['latency_ms_p50'] for row in entry['rows']
             if row['variant'] == 'naive fp32'}
    by_generate = {row['batch']: row for row in entry['rows']
                   if row['variant'] == 'generate compiled'}
    for row in entry['rows']:
        batch = row['batch']
        add_floor(row, entry, bandwidth, prompt_length, model)
        row['speedup_vs_naive'] = (naive[batch] / row['latency_ms_p50']
                                   if batch in naive else None)
        baseline = by_generate.get(batch)
        if row['variant'] in ('fast', 'fast, cuBLAS matmuls', 'loop eager') and baseline:
            row['speedup_vs_generate'] = baseline['latency_ms_p50'] / row['latency_ms_p50']
            row['decode_speedup_vs_generate'] = (baseline['decode_ms_per_token']
                                                 / row['decode_ms_per_token'])


def benchmark_model(run, language_model, name, bandwidth, keep_for_training):
    """Build one architecture and measure naive, eager and fast captioning on it."""
    import torch
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    from blip2_ros.decode import use_one_row_reductions

    quick = run.args.quick
    device = run.device
    entry = {'name': name, 'rows': []}
    run.results['models'][name] = entry
    started = time.perf_counter()
    processor = build_processor(language_model, quick)
    try:
        pil_processor = build_processor(language_model, quick, pil=True)
    except (TypeError, ValueError) as error:
        run.log(f'PIL image processor unavailable ({error}); naive uses the default one')
        pil_processor = processor
    model = build_model(language_model, quick, processor, device)
    synchronize(device)
    entry['build_s'] = time.perf_counter() - started
    entry['parameters'] = {part: sum(p.numel() for p in getattr(model, part).parameters())
                           for part in ('vision_model', 'qformer', 'language_model')}
    entry['image_processor'] = type(processor.image_processor).__name__
    entry['naive_image_processor'] = type(pil_processor.image_processor).__name__
    run.log(f"{name}: built in {entry['build_s']:.1f} s, parameters {entry['parameters']}")
    repeats = 2 if quick else 5
    run.section('naive', f'{name} naive', measure_naive, run, model, pil_processor, entry,
                2 if quick else 3)
    to_bfloat16(model)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    entry['decode_step_bytes'] = decode_step_bytes(model)
    entry['once_bytes'] = once_bytes(model)
    eager = Blip2Captioner.from_model(model, processor, CaptionerConfig(
        model=name, max_new_tokens=NEW_TOKENS))
    run.section('eager', f'{name} bf16 eager', measure_captioner, run, eager, entry,
                'bf16 eager', (1,), 2 if quick else 3, 1)
    fast = Blip2Captioner.from_model(model, processor, CaptionerConfig(
        model=name, max_new_tokens=NEW_TOKENS, cache='static', torch_compile=True))
    # The rows the goals judge first (batch 1 and 4), so that a short budget skips baselines.
    run.section('compile', f'{name} fast', measure_captioner, run, fast, entry, 'fast',
                BATCH_SIZES, repeats, 3)
    if device.type == 'cuda':
        # The fast path as it was before OneRowLinear: the same compiled graphs with cuBLAS's
        # kernels for the one-row products. The layers stay nn.Linear for the baselines below
        # too: OneRowLinear would otherwise go into every compiled graph (generate's too).
        # (On a CPU the captioner never makes them OneRowLinear.)
        cublas = Blip2Captioner.from_model(model, processor, CaptionerConfig(
            model=name, max_new_tokens=NEW_TOKENS, cache='static', torch_compile=True))
        use_one_row_reductions(model.language_model, enable=False)
        run.section('compile', f'{name} fast, cuBLAS matmuls', measure_captioner, run, cublas,
                    entry, 'fast, cuBLAS matmuls', (1,), repeats, 3)
        del cublas
    if language_model == 'opt':
        # Captioners of their own, each with its own static caches. Any option besides
        # min_new_tokens sends a captioner to generate(); this one lets generate() compile its
        # step as it does by default (on CUDA; elsewhere it runs eager).
        by_generate = Blip2Captioner.from_model(model, processor, CaptionerConfig(
            model=name, max_new_tokens=NEW_TOKENS, cache='static'))
        run.section('compile', f'{name} generate compiled', measure_captioner, run,
                    by_generate, entry, 'generate compiled', (1,), repeats, 3,
                    disable_compile=False)
        loop = Blip2Captioner.from_model(model, processor, CaptionerConfig(
            model=name, max_new_tokens=NEW_TOKENS, cache='static'))
        run.section('eager', f'{name} loop eager', measure_captioner, run, loop, entry,
                    'loop eager', (1,), repeats, 2)
        del by_generate, loop
    entry['fast_path'] = {'static_cache': fast.static_cache, 'decode_loop': fast.decode_loop,
                          'compiled_decode': fast.compile_decode}
    if language_model == 'opt' and device.type == 'cuda' and not run.results['preprocess']:
        run.section('batch', 'preprocess on cuda', measure_preprocess, run, fast)
    prompt_length = prompt_length_of(fast)
    add_floor_and_ratios(entry, run.results['bandwidth']['floor_bytes_per_s'], prompt_length,
                         model)
    run.save()
    if keep_for_training:
        return model, processor
    del model, eager, fast
    # The compiled methods point back at their captioner: only the cycle collector frees the
    # model, and the next model's peak memory would count this one's weights too.
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return None


def measure_preprocess(run, captioner):
    """Benchmark 1 on the GPU: the fast path against the checkpoint's image processor."""
    import bench_preprocess
    rows = bench_preprocess.measure(captioner, 'cuda', repeats=20)
    run.results['preprocess'] = rows
    for row in rows:
        run.log(f"preprocess cuda {row['frame']}: {row['node_ms_p50']:.2f} ms vs "
                f"{row['reference_ms_p50']:.2f} ms ({row['reference_class']}), max diff "
                f"{row['max_diff_levels']:.2f} levels")


def training_methods():
    """Return (apply_method, ModelArguments) from training/train.py, or a stand-in."""
    try:
        from training.train import apply_method, ModelArguments
        return apply_method, ModelArguments, 'training.train.apply_method'
    except ImportError:
        return None, None, 'stand-in (training.train did not import)'


def apply_stand_in(model, method):
    """Do what training/train.py does for qformer and lora, if it cannot be imported."""
    if method == 'qformer':
        for name, parameter in model.named_parameters():
            trainable = name.startswith(('qformer.', 'query_tokens', 'language_projection.'))
            parameter.requires_grad_(trainable)
            if trainable:
                parameter.data = parameter.data.float()
        return model
    from peft import get_peft_model, LoraConfig
    return get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, bias='none',
        target_modules=r'language_model\..*\.(q_proj|v_proj)'))


def measure_training(run, model, processor):
    """Samples/s and peak memory of the qformer and lora methods (opt-2.7b architecture)."""
    import torch

    device = run.device
    quick = run.args.quick
    apply_method, model_arguments, source = training_methods()
    run.results['training']['methods_from'] = source
    batch_size = 2 if quick else 16
    caption_tokens = 20
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids('<image>')
    queries = num_query_tokens(quick)
    generator = torch.Generator().manual_seed(0)
    captions = torch.randint(10, len(tokenizer) - 1, (batch_size, caption_tokens),
                             generator=generator)
    input_ids = torch.cat([torch.full((batch_size, queries), image_token), captions], dim=1)
    labels = input_ids.clone()
    labels[:, :queries] = -100  # image tokens are not predicted
    batch = {
        'pixel_values': torch.randn(batch_size, 3, 224, 224, generator=generator).to(device),
        'input_ids': input_ids.to(device), 'attention_mask': torch.ones_like(input_ids).to(
            device), 'labels': labels.to(device)}
    for method in ('qformer', 'lora'):
        if not run.budget.allows('training'):
            run.results['skipped'].append(f'training {method}')
            run.log(f'skipped training {method}: budget')
            continue
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if apply_method:
            trained = apply_method(model, model_arguments(model='bench', method=method))
        else:
            trained = apply_stand_in(model, method)
        trained.train()
        parameters = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)

        def step(trained=trained, optimizer=optimizer):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = trained(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        warmup, steps = (1, 2) if quick else (3, 6)
        for _ in range(warmup):
            step()
        synchronize(device)
        reset_peak(device)
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize(device)
        elapsed = time.perf_counter() - started
        run.results['training'][method] = {
            'batch_size': batch_size, 'steps': steps, 'seconds': elapsed,
            'samples_per_s': batch_size * steps / elapsed, 'peak_gib': peak_gib(device),
            'trainable_parameters': sum(p.numel() for p in parameters),
            'loss': float(loss.detach()), 'tokens_per_sample': input_ids.shape[1]}
        run.log(f'training {method}: {batch_size * steps / elapsed:.1f} samples/s, '
                f'peak {peak_gib(device) or 0:.1f} GiB')
        if method == 'lora':
            trained.unload()  # the adapters off again, the base weights as they were
    model.eval()


def judge(results):
    """Goal verdicts from the measured rows."""
    goals = []
    opt = results['models'].get('opt-2.7b', {})
    fast = {row['batch']: row for row in opt.get('rows', []) if row['variant'] == 'fast'}
    if 1 in fast:
        row = fast[1]
        goals.append(common.goal(
            f'opt-2.7b batch 1 within {GOAL_FLOOR_RATIO:g}x the bandwidth floor',
            row['vs_floor'] <= GOAL_FLOOR_RATIO,
            f"{row['latency_ms_p50']:.1f} ms vs floor {row['floor_ms']:.1f} ms "
            f"({row['vs_floor']:.2f}x); decode {row['decode_ms_per_token']:.2f} ms/token "
            f"({row['decode_vs_floor']:.2f}x its floor), rest {row['one_token_ms']:.1f} ms"))
    else:
        goals.append(common.goal('opt-2.7b batch 1 within 2x the bandwidth floor', False,
                                 'not measured (see errors/skipped)'))
    if 1 in fast and 4 in fast:
        ratio = fast[4]['latency_ms_p50'] / fast[1]['latency_ms_p50']
        goals.append(common.goal(
            f'opt-2.7b batch 4 within {GOAL_BATCH4_RATIO:g}x of batch 1',
            ratio <= GOAL_BATCH4_RATIO,
            f"{fast[4]['latency_ms_p50']:.1f} vs {fast[1]['latency_ms_p50']:.1f} ms "
            f'({ratio:.2f}x)'))
    else:
        goals.append(common.goal('opt-2.7b batch 4 within 1.3x of batch 1', False,
                                 'not measured (see errors/skipped)'))
    return goals


ROW_COLUMNS = [('variant', 'variant'), ('batch', 'batch'), ('latency_ms_p50', 'latency ms'),
               ('captions_per_s', 'captions/s'), ('peak_gib', 'peak GiB'),
               ('floor_ms', 'floor ms'), ('vs_floor', 'x floor'),
               ('speedup_vs_naive', 'x faster than naive'), ('one_token_ms', '1-token ms'),
               ('decode_ms_per_token', 'decode ms/token'),
               ('speedup_vs_generate', 'x faster than generate compiled'),
               ('decode_speedup_vs_generate', 'decode x faster than generate compiled'),
               ('first_call_s', 'first call s')]


def report(results):
    """Print every table."""
    bandwidth = results.get('bandwidth', {})
    print(f"\nGPU benchmark on {results['machine'].get('gpu', results['device'])}; floor "
          f"bandwidth {bandwidth.get('floor_bytes_per_s', 0) / 1e12:.2f} TB/s "
          f"({bandwidth.get('source')}), measured copy "
          f"{bandwidth.get('measured_copy_bytes_per_s', 0) / 1e12:.2f} TB/s; "
          f'{NEW_TOKENS} new tokens forced per caption')
    for name, entry in results['models'].items():
        print(f"\n{name} (image processor {entry.get('image_processor')}, naive uses "
              f"{entry.get('naive_image_processor')}; fast path {entry.get('fast_path')})")
        print(common.table(entry['rows'], ROW_COLUMNS))
    if results['preprocess']:
        import bench_preprocess
        print('\nPreprocessing on the GPU')
        print(common.table(results['preprocess'], bench_preprocess.COLUMNS))
    training = {key: value for key, value in results['training'].items()
                if isinstance(value, dict)}
    if training:
        print('\nTraining (opt-2.7b architecture, 224 px, bf16 autocast; methods from '
              f"{results['training'].get('methods_from')})")
        print(common.table([dict(method=key, **value) for key, value in training.items()],
                           ['method', 'batch_size', 'samples_per_s', 'peak_gib',
                            'trainable_parameters', 'seconds']))
    if results['skipped']:
        print('\nSkipped (time budget): ' + ', '.join(results['skipped']))
    for error in results['errors']:
        print(f"\nERROR in {error['section']}: {error['error']}\n{error['traceback']}")
    print()
    print(common.goals_table(results['goals']))


def start_watchdog(run, grace_s):
    """Print what was measured and exit if the run overruns its budget by ``grace_s``."""
    def watch():
        while run.budget.left() > -grace_s:
            time.sleep(1.0)
        run.log('budget overrun: printing the partial results and exiting')
        try:
            run.results['errors'].append({'section': 'watchdog', 'error': 'budget overrun',
                                          'traceback': ''})
            run.results['goals'] = judge(run.results)
            run.save()
            report(run.results)
        finally:
            os._exit(3)  # whatever the report did, a run past its budget must end
    threading.Thread(target=watch, daemon=True).start()


def add_inductor_argument(parser):
    """Add --inductor NAME=VALUE: compiler settings to try on the fast path."""
    parser.add_argument('--inductor', action='append', default=[], metavar='NAME=VALUE',
                        help='set torch._inductor.config NAME (a Python literal VALUE) before '
                             'anything compiles, e.g. coordinate_descent_tuning=True or '
                             'max_autotune=True; repeatable, recorded in the JSON')


def apply_inductor_settings(settings):
    """Set each NAME=VALUE of --inductor on torch._inductor.config; return them as a dict."""
    import ast

    import torch._inductor.config as inductor_config

    applied = {}
    for setting in settings:
        name, _, text = setting.partition('=')
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f'--inductor {setting}: VALUE must be a Python literal') from None
        owner, _, attribute = name.strip().rpartition('.')
        target = inductor_config
        try:
            for part in filter(None, owner.split('.')):
                target = getattr(target, part)
            setattr(target, attribute, value)
        except AttributeError as error:
            raise SystemExit(f'--inductor {setting}: {error}') from None
        applied[name.strip()] = value
    return applied


def main(argv=None):
    """Run the GPU benchmark (or its tiny CPU smoke version with --quick)."""
    parser = common.argument_parser(
        __doc__.strip().splitlines()[0],
        'tiny models of the same structure, on the CPU unless a GPU is present (smoke run)')
    parser.add_argument('--training', action='store_true',
                        help='also measure training throughput (qformer and lora)')
    parser.add_argument('--budget-s', type=float, default=420.0,
                        help='wall-clock budget of the whole run in seconds (default 420)')
    parser.add_argument('--models', default='opt,t5',
                        help='comma-separated: opt (blip2-opt-2.7b), t5 (blip2-flan-t5-xl)')
    add_inductor_argument(parser)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    import torch

    if not torch.cuda.is_available() and not args.quick:
        print('bench_gpu: torch sees no CUDA GPU; run with --quick for the tiny CPU smoke run')
        return 2
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    run = Run(args, device)
    run.results['inductor'] = apply_inductor_settings(args.inductor)
    start_watchdog(run, grace_s=45.0)
    floor_bandwidth, source, measured = memory_bandwidth(device)
    run.results['bandwidth'] = {'floor_bytes_per_s': floor_bandwidth, 'source': source,
                                'measured_copy_bytes_per_s': measured}
    run.log(f'device {device} {run.results["machine"].get("gpu", "")}: floor bandwidth '
            f'{floor_bandwidth / 1e12:.2f} TB/s ({source}), copy {measured / 1e12:.2f} TB/s')
    wanted = [name.strip() for name in args.models.split(',') if name.strip()]
    if 'opt' in wanted:
        kept = run.section('build', 'opt-2.7b', benchmark_model, run, 'opt', 'opt-2.7b',
                           floor_bandwidth, args.training)
        if args.training and kept:
            run.section('training', 'training', measure_training, run, *kept)
        del kept
        gc.collect()  # see benchmark_model: compiled methods keep the model in a cycle
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    if 't5' in wanted:
        run.section('build', 'flan-t5-xl', benchmark_model, run, 't5', 'flan-t5-xl',
                    floor_bandwidth, False)
    run.results['goals'] = judge(run.results)
    run.save()
    report(run.results)
    common.finish(run.results, args.json)
    if run.out_path:
        print(f'JSON also written to {run.out_path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
