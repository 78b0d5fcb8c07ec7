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
Start-up with torch_compile: a start that compiles everything against one that reuses the cache.

Each start is a new process that loads the model and warms the captioner up as the node does
for two cameras (batch sizes 1 and 2), then captions. The first start finds the compile cache
empty, as every start did after a reboot while torch kept that cache in the temporary folder;
the later starts find what the first one kept (``~/.cache/blip2_ros/torch_compile``, here in a
temporary home). Baseline: the first start, in the same run. The model is the demo's tiny
factory model (models/factory-tiny) on a rendered factory scene; on a GPU
``--architecture opt-2.7b`` builds blip2-opt-2.7b from its published
configuration with random weights, as bench_gpu.py does.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common

# The demo's model (captions of factory scenes), for a caption that means something.
DEMO_MODEL = os.path.join(common.REPO_ROOT, 'models', 'factory-tiny')
COLUMNS = [('start', 'start'), ('cache', 'cache found'), ('load_s', 'load s'),
           ('warm_up_s', 'compile (warm-up) s'), ('process_s', 'whole start s'),
           ('caption_ms', 'caption ms'), ('hits', 'graphs from the cache'),
           ('misses', 'graphs compiled'), ('speedup', 'x faster warm-up than the first')]


def child(args):
    """One start: load, warm up, caption; print what it took as one JSON line."""
    common.quiet_libraries()
    import numpy as np
    import torch
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    from blip2_ros.checkpoint import resolve_device

    started = time.perf_counter()
    config = CaptionerConfig(model=DEMO_MODEL, device=args.device, torch_compile=True,
                             max_new_tokens=args.new_tokens)
    if args.architecture == 'tiny':
        captioner = Blip2Captioner(config)
    else:
        import bench_gpu
        torch.manual_seed(0)  # the same random weights in every start
        # --quick: the same structure at a tiny size, to check this path on a CPU.
        processor = bench_gpu.build_processor('opt', args.quick)
        model = bench_gpu.build_model('opt', args.quick, processor,
                                      resolve_device(args.device))
        captioner = Blip2Captioner.from_model(bench_gpu.to_bfloat16(model), processor, config)
    synchronize = torch.cuda.synchronize if captioner.device.type == 'cuda' else None
    loaded = time.perf_counter()
    captioner.warm_up(args.batch_sizes)
    if synchronize:
        synchronize()
    warmed = time.perf_counter()
    if args.architecture == 'tiny':
        from blip2_ros.demo.synthetic_factory import scene_at
        frame = scene_at(7, 0, size=(480, 640)).image
    else:
        frame = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    captions = []
    times = common.time_calls(lambda: captions.append(captioner.caption([frame])[0]), 5,
                              synchronize=synchronize)
    counters = torch._dynamo.utils.counters['inductor']
    print(json.dumps({
        'load_s': loaded - started, 'warm_up_s': warmed - loaded,
        'caption_ms': common.summary(times)['p50'], 'caption': captions[-1],
        'compiled': captioner.compile_decode, 'folder': captioner.compile_cache,
        'device': str(captioner.device),
        'hits': counters['fxgraph_cache_hit'], 'misses': counters['fxgraph_cache_miss']}))
    return 0


def start(args, home):
    """Run one start in a new process with ``home`` as its cache home; return its results."""
    environment = dict(os.environ, XDG_CACHE_HOME=home)
    # As on a robot where nobody chose a folder: the captioner picks it.
    environment.pop('TORCHINDUCTOR_CACHE_DIR', None)
    command = [sys.executable, os.path.abspath(__file__), '--child', '--device', args.device,
               '--architecture', args.architecture, '--new-tokens', str(args.new_tokens),
               '--batch-sizes', ','.join(map(str, args.batch_sizes))]
    command += ['--quick'] if args.quick else []
    began = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f'a start failed:\n{result.stderr[-3000:]}')
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row['process_s'] = time.perf_counter() - began
    return row


def main(argv=None):
    """Run the starts, print the table, write JSON."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0],
                                    'two starts with batch size 1 only (smoke run)')
    parser.add_argument('--device', default='auto',
                        help="'auto' (default: a CUDA GPU if torch sees one), 'cpu' or 'cuda'")
    parser.add_argument('--architecture', choices=('tiny', 'opt-2.7b'), default='tiny',
                        help="the demo's tiny factory model (default), or blip2-opt-2.7b "
                             'with random weights')
    parser.add_argument('--starts', type=int, default=3, help='starts in all (default 3)')
    # Used only by the benchmark's own child processes.
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--new-tokens', type=int, default=30, help=argparse.SUPPRESS)
    parser.add_argument('--batch-sizes', default='1,2', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(',')]
    if args.child:
        return child(args)
    if args.quick:
        args.starts, args.batch_sizes, args.new_tokens = 2, [1], 8
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        home = os.path.join(folder, 'home-cache')
        for index in range(args.starts):
            row = start(args, home)
            row['start'] = index + 1
            row['cache'] = 'empty' if index == 0 else 'kept'
            row['speedup'] = rows[0]['warm_up_s'] / row['warm_up_s'] if rows else 1.0
            rows.append(row)
            print(f"start {index + 1}: warm-up {row['warm_up_s']:.1f} s", flush=True)
    same = len({row['caption'] for row in rows}) == 1
    compiled = all(row['compiled'] for row in rows)
    model = args.architecture + (' structure at a tiny size (--quick)'
                                 if args.quick and args.architecture != 'tiny' else '')
    print(f"\ntorch_compile start-up, {model} on {rows[0]['device']}, warm-up for batch "
          f'sizes {args.batch_sizes}, {args.new_tokens} new tokens')
    print(common.table(rows, COLUMNS, digits=1))
    print(f'\nsame caption in every start: {same}; every start compiled: {compiled}')
    return common.finish({'benchmark': 'compile_cache', 'machine': common.machine_info(),
                          'architecture': args.architecture, 'device': rows[0]['device'],
                          'batch_sizes': args.batch_sizes, 'new_tokens': args.new_tokens,
                          'rows': rows, 'same_caption': same, 'all_compiled': compiled},
                         args.json)


if __name__ == '__main__':
    raise SystemExit(main())
