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
Where a 30-token blip2-opt-2.7b caption spends its GPU time: a diagnostic beside bench_gpu.py.

Builds the model as bench_gpu.py does (random weights, bfloat16), compiles the captioner's fast
path for batch 1, then prints

* the caption's latency, its first token's, and the decode time per token;
* how long the decode step's weight reads take on their own: every Linear of the language model
  as a one-row matmul (what a batch-1 decode step does with its weights), captured in one CUDA
  graph, as time and bandwidth. That is what the matmul kernels torch picks can do, the
  practical floor of the step on this stack;
* torch.profiler's table of the kernels of three captions, and how long the GPU sat idle within
  the last one. The trace goes to ``$OUT/decode_trace.json.gz`` when OUT is set.

    python3 benchmarks/profile_gpu_decode.py          # on the GPU machine, about 2 minutes
    python3 benchmarks/profile_gpu_decode.py --quick  # tiny model, any machine: a smoke run
    python3 benchmarks/profile_gpu_decode.py --inductor coordinate_descent_tuning=True
"""

import argparse
import gzip
import json
import os
import tempfile
import time

import bench_gpu
import common

NEW_TOKENS = 30


def weight_reads_ms(language_model, device, repeats=50):
    """Time one-row matmuls over every Linear weight, replayed as one CUDA graph; (ms, bytes)."""
    import torch

    weights = [module.weight for module in language_model.modules()
               if isinstance(module, torch.nn.Linear)]
    rows = {weight.shape[1]: torch.randn(1, weight.shape[1], device=device, dtype=weight.dtype)
            for weight in weights}
    size = sum(weight.numel() * weight.element_size() for weight in weights)

    def read_all():
        for weight in weights:
            torch.nn.functional.linear(rows[weight.shape[1]], weight)

    read_all()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        read_all()
    graph.replay()
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - started) * 1000.0 / repeats, size


def idle_within_last_caption(events):
    """From a chrome trace: (kernels, span ms, busy ms) of the last of the profiled captions."""
    kernels = sorted((event['ts'], event['ts'] + event['dur']) for event in events
                     if event.get('cat') == 'kernel' and 'dur' in event)
    if len(kernels) < 3:
        return None
    # Captions are separated by the host's wait for the GPU: the largest gaps.
    gaps = sorted((kernels[index + 1][0] - kernels[index][1], index + 1)
                  for index in range(len(kernels) - 1))
    last = kernels[max(index for _, index in gaps[-2:]):]
    busy, covered = 0.0, last[0][0]
    for start, end in last:
        busy += max(0.0, end - max(start, covered))
        covered = max(covered, end)
    return len(last), (last[-1][1] - last[0][0]) / 1000.0, busy / 1000.0


def main(argv=None):
    """Build, compile, time and profile; print the findings."""
    import torch
    from torch.profiler import profile, ProfilerActivity

    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='a tiny model: a smoke run')
    bench_gpu.add_inductor_argument(parser)
    args = parser.parse_args(argv)
    settings = bench_gpu.apply_inductor_settings(args.inductor)
    if settings:
        print(f'inductor settings: {settings}')
    quick = args.quick
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    processor = bench_gpu.build_processor('opt', quick)
    model = bench_gpu.to_bfloat16(bench_gpu.build_model('opt', quick, processor, device))
    captioner = Blip2Captioner.from_model(model, processor, CaptionerConfig(
        model='opt-2.7b', max_new_tokens=NEW_TOKENS, cache='static', torch_compile=True))
    frames = bench_gpu.frames_for(1)
    forced = {'max_new_tokens': NEW_TOKENS, 'min_new_tokens': NEW_TOKENS}
    started = time.perf_counter()
    captioner.caption(frames, **forced)
    print(f'first call (compiling) {time.perf_counter() - started:.1f} s')

    def median_ms(**options):
        times = common.time_calls(lambda: captioner.caption(frames, **options), 7, warmup=2,
                                  synchronize=lambda: bench_gpu.synchronize(device))
        return common.summary(times)['p50']

    full = median_ms(**forced)
    first = median_ms(max_new_tokens=1)
    step_bytes = bench_gpu.decode_step_bytes(model)
    print(f'{NEW_TOKENS} tokens {full:.2f} ms, first token {first:.2f} ms, decode '
          f'{(full - first) / (NEW_TOKENS - 1):.3f} ms/token ({step_bytes / 1e9:.2f} GB read '
          'per step at least)')
    if device.type == 'cuda':
        milliseconds, size = weight_reads_ms(model.language_model, device)
        print(f'one-row matmuls over the {size / 1e9:.2f} GB of Linear weights, one CUDA graph: '
              f'{milliseconds:.3f} ms ({size / milliseconds / 1e9:.2f} TB/s)')
    activities = [ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        for _ in range(3):
            captioner.caption(frames, **forced)
            bench_gpu.synchronize(device)
    sort = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    print(profiler.key_averages().table(sort_by=sort, row_limit=25,
                                        max_name_column_width=70))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        profiler.export_chrome_trace(path)
        with open(path, encoding='utf-8') as stream:
            events = json.load(stream)['traceEvents']
    if os.environ.get('OUT'):
        with gzip.open(os.path.join(os.environ['OUT'], 'decode_trace.json.gz'), 'wt') as stream:
            json.dump(events, stream)
    last = idle_within_last_caption(events)
    if last:
        count, span, busy = last
        print(f'last caption under the profiler: {count} kernels over {span:.2f} ms, GPU busy '
              f'{busy:.2f} ms, idle {span - busy:.2f} ms')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
