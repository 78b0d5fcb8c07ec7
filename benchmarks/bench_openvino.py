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
The OpenVINO backend on a CPU: speed against the local backend, and caption agreement.

In one process, on the same frames:

* a BLIP-2 of small but realistic shape with random weights (ViT 384 x 6 at 224 px, Q-Former
  384 x 4 with 32 queries, OPT 512 x 6, vocabulary 50272), 20 new tokens, greedy: latency at
  batch 1 and 8 of transformers' ``generate``, the local backend, and the OpenVINO backend
  with fp32 and int8 weights, each as a ratio to the local backend; whether the captions equal
  the local backend's; the one-time conversion and a start from the converted cache;
* the demo model (models/factory-tiny) on frames of a scene stream it never saw: how often the
  OpenVINO fp32 and int8 captions equal the local backend's and the truth.

    .venv/bin/python benchmarks/bench_openvino.py             # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_openvino.py --threads 2
"""

import os
import statistics
import tempfile
import time

from bench_quantization_cpu import realistic_checkpoint
import common

NEW_TOKENS = 20
BATCH_SIZES = (1, 8)


def timed_captions(caption, frames, repeats):
    """Caption ``frames`` once untimed, then ``repeats`` times; return (captions, p50 ms)."""
    captions = caption(frames)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        caption(frames)
        times.append((time.perf_counter() - started) * 1000.0)
    return captions, statistics.median(times)


def generate_captioner(folder):
    """Return a function that captions frames with the processor and plain generate()."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(folder)

    @torch.inference_mode()
    def caption(frames):
        inputs = processor(images=list(frames), text=[''] * len(frames), return_tensors='pt')
        output = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS)
        texts = processor.tokenizer.batch_decode(output[:, inputs['input_ids'].shape[1]:],
                                                 skip_special_tokens=True)
        return [text.strip() for text in texts]
    return caption


def realistic_rows(folder, frames, repeats):
    """Time every way of captioning on the realistic checkpoint; return the table rows."""
    from blip2_ros.captioner import CaptionerConfig, make_captioner

    def config(backend, weights='fp32'):
        return CaptionerConfig(model=folder, device='cpu', dtype='float32', backend=backend,
                               openvino_weights=weights, max_new_tokens=NEW_TOKENS)

    # The local backend first: every other row is compared with it.
    ways = {'local backend': lambda: _forced(make_captioner(config('local'))),
            'transformers generate': lambda: generate_captioner(folder)}
    starts = {}
    for weights in ('fp32', 'int8'):
        def load(weights=weights):
            started = time.perf_counter()
            captioner = make_captioner(config('openvino', weights))
            starts[weights] = {'first_start_s': time.perf_counter() - started}
            started = time.perf_counter()
            captioner = make_captioner(config('openvino', weights))
            assert not captioner.converted_now
            starts[weights]['cached_start_s'] = time.perf_counter() - started
            return _forced(captioner)
        ways[f'OpenVINO {weights}'] = load
    rows, local = [], {}
    for name, make in ways.items():
        caption = make()
        for batch_size in BATCH_SIZES:
            batch = frames[:batch_size]
            captions, p50 = timed_captions(caption, batch, repeats[batch_size])
            if name == 'local backend':
                local[batch_size] = (captions, p50)
            reference, local_ms = local.get(batch_size, (None, None))
            row = {'way': name, 'batch': batch_size, 'latency_ms_p50': p50,
                   'ms_per_frame': p50 / batch_size,
                   'speed_vs_local': local_ms / p50 if local_ms else None,
                   'captions_equal_local': captions == reference if reference else None}
            rows.append(row)
            print(row, flush=True)
        del caption
    return rows, starts


def _forced(captioner):
    """Return a function that captions with exactly NEW_TOKENS new tokens."""
    return lambda frames: captioner.caption(frames, min_new_tokens=NEW_TOKENS)


def demo_agreement(count):
    """Caption demo frames with the local backend and OpenVINO fp32 / int8; compare them."""
    from blip2_ros.captioner import CaptionerConfig, make_captioner
    from blip2_ros.demo.run import demo_model_path, recorded_frame_size
    from blip2_ros.demo.synthetic_factory import scene_at

    width, height = recorded_frame_size(demo_model_path())
    scenes = [scene_at(7, index, (height, width)) for index in range(count)]
    frames = [scene.image for scene in scenes]
    captions = {}
    for name, backend, weights in (('local', 'local', 'fp32'), ('fp32', 'openvino', 'fp32'),
                                   ('int8', 'openvino', 'int8')):
        captioner = make_captioner(CaptionerConfig(
            model=demo_model_path(), device='cpu', dtype='float32', backend=backend,
            openvino_weights=weights))
        captions[name] = [text for start in range(0, count, 8)
                          for text in captioner.caption(frames[start:start + 8])]
    rows = []
    for name in ('local', 'fp32', 'int8'):
        rows.append({
            'captions': name if name == 'local' else f'OpenVINO {name}', 'frames': count,
            'equal_local': sum(a == b for a, b in zip(captions[name], captions['local'])) / count,
            'equal_truth': sum(a == s.caption for a, s in zip(captions[name], scenes)) / count})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    """Run the benchmark; print tables and JSON."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0], 'fewer frames and repeats')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads for torch and OpenVINO alike (default 1)')
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    results = {'machine': common.machine_info()}
    results['machine']['openvino'] = common.package_version('openvino')
    results['machine']['nncf'] = common.package_version('nncf')
    with tempfile.TemporaryDirectory() as folder:
        # Converted models go to a folder of their own: the first start converts.
        os.environ['XDG_CACHE_HOME'] = os.path.join(folder, 'cache')
        results['demo_model'] = demo_agreement(40 if args.quick else 200)
        checkpoint = realistic_checkpoint(os.path.join(folder, 'realistic'))
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
        repeats = {1: 3, 8: 1} if args.quick else {1: 8, 8: 3}
        results['realistic'], results['starts'] = realistic_rows(checkpoint, frames, repeats)
    print(common.table(results['demo_model'], ['captions', 'frames', 'equal_local',
                                               'equal_truth']))
    print()
    print(common.table(results['realistic'], [
        'way', 'batch', 'latency_ms_p50', 'ms_per_frame', 'speed_vs_local',
        'captions_equal_local']))
    print()
    print(common.table([dict(weights=name, **values) for name, values in
                        results['starts'].items()],
                       ['weights', 'first_start_s', 'cached_start_s']))
    return common.finish(results, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
