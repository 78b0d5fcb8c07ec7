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
Weight-only 8- and 4-bit BLIP-2: memory, speed and caption agreement against 16/32-bit weights.

Builds blip2-opt-2.7b from its published configuration with random weights (or, with
``--quick``, the tiny model of the same structure), saves it as a checkpoint, then loads that
checkpoint once per variant through ``from_pretrained`` with a transformers quantization
config, the way a user's checkpoint is loaded:

* ``none``: the baseline, bfloat16 on a GPU, float32 on a CPU;
* ``bitsandbytes int8`` (LLM.int8) and ``bitsandbytes int4`` (NF4, bfloat16 compute): GPU only;
* ``torchao int8`` and ``torchao int4`` (weight-only, group size 128): GPU and CPU.

Per variant: GPU memory allocated after loading (the weights), peak memory while captioning,
batch-1 latency of a 30-token caption (p50 of 3), and how many of 8 frames get the baseline's
30 tokens. With random weights the agreement says little about a trained model; it is measured
on a trained model in the tests and docs. A variant that fails records its error and the run
goes on. Results to stdout and to ``$OUT/bench_quantization.json`` when OUT is set.
"""

import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NEW_TOKENS = 30
FRAMES = 8


def variants(torch, cuda):
    """Return (name, factory of a quantization config or None) for this device."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    def torchao(kind):
        def make():
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
            return TorchAoConfig(Int8WeightOnlyConfig() if kind == 8
                                 else Int4WeightOnlyConfig(group_size=128))
        return make

    rows = [('none', None)]
    if cuda:
        rows += [('bitsandbytes int8', lambda: BitsAndBytesConfig(load_in_8bit=True)),
                 ('bitsandbytes int4', lambda: BitsAndBytesConfig(
                     load_in_4bit=True, bnb_4bit_quant_type='nf4',
                     bnb_4bit_compute_dtype=torch.bfloat16))]
    rows += [('torchao int8', torchao(8)), ('torchao int4', torchao(4))]
    return rows


def measure(folder, name, make_config, frames, baseline, device, dtype):
    """Load ``folder`` with one quantization config and caption ``frames``."""
    import torch
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    cuda = device.type == 'cuda'
    row = {'variant': name}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    options = {'dtype': dtype}
    if make_config is not None:
        options['quantization_config'] = make_config()
    if cuda:
        options['device_map'] = {'': device.index or 0}
    model = Blip2ForConditionalGeneration.from_pretrained(folder, **options).eval()
    row['load_s'] = round(time.perf_counter() - started, 2)
    row['footprint_gib'] = round(model.get_memory_footprint() / 2**30, 3)
    if cuda:
        row['weights_gib'] = round((torch.cuda.memory_allocated() - before) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    processor = Blip2Processor.from_pretrained(folder)
    captioner = Blip2Captioner.from_model(model, processor, CaptionerConfig(
        model=name, max_new_tokens=NEW_TOKENS))
    with torch.inference_mode():
        captioner.caption(frames[:1], min_new_tokens=NEW_TOKENS)  # warm-up
        times = []
        for _ in range(3):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            captioner.caption(frames[:1], min_new_tokens=NEW_TOKENS)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000.0)
        captions = [captioner.caption([frame], min_new_tokens=NEW_TOKENS)[0]
                    for frame in frames]
    row['latency_ms_p50'] = round(statistics.median(times), 1)
    if cuda:
        row['peak_gib'] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if baseline is not None:
        row['agreement'] = sum(a == b for a, b in zip(captions, baseline)) / len(frames)
    del captioner, model
    gc.collect()
    return row, captions


def main(argv=None):
    """Run the quantization benchmark."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='tiny model (smoke run)')
    parser.add_argument('--only', default='', help='comma-separated variant names to run')
    parser.add_argument('--budget-s', type=float, default=600.0,
                        help='skip the variants that start after this many seconds')
    args = parser.parse_args(argv)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    import bench_gpu
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {'device': torch.cuda.get_device_name() if cuda else 'cpu',
               'torch': torch.__version__, 'rows': []}
    try:
        import transformers
        results['transformers'] = transformers.__version__
        for package in ('bitsandbytes', 'torchao'):
            try:
                results[package] = __import__(package).__version__
            except Exception as error:  # noqa: BLE001 - any import failure is reported
                results[package] = f'not importable: {error}'
    except ImportError:
        pass
    run_started = time.perf_counter()
    generator = np.random.default_rng(0)
    frames = [generator.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(FRAMES)]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        processor = bench_gpu.build_processor('opt', args.quick)
        model = bench_gpu.build_model('opt', args.quick, processor, device)
        if cuda:
            bench_gpu.to_bfloat16(model)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        results['build_and_save_s'] = round(time.perf_counter() - started, 1)
        print(f'checkpoint saved in {results["build_and_save_s"]} s', flush=True)
        baseline = None
        wanted = {name.strip() for name in args.only.split(',') if name.strip()}
        for name, make_config in variants(torch, cuda):
            if wanted and name not in wanted and name != 'none':
                continue
            if time.perf_counter() - run_started > args.budget_s:
                results['rows'].append({'variant': name, 'error': 'skipped: time budget'})
                continue
            try:
                row, captions = measure(folder, name, make_config, frames, baseline, device,
                                        dtype)
                if baseline is None:
                    baseline = captions
                    row['example_caption'] = captions[0][:60]
            except Exception as error:  # noqa: BLE001 - a failed variant is a result
                row = {'variant': name, 'error': ' '.join(str(error).split())[:300]}
                traceback.print_exc()
            results['rows'].append(row)
            print(json.dumps(row), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    text = json.dumps(results, indent=2)
    print(text)
    out = os.environ.get('OUT')
    if out:
        with open(os.path.join(out, 'bench_quantization.json'), 'w') as stream:
            stream.write(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
