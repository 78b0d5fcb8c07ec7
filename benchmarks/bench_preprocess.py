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
Benchmark 1: the node's preprocessing against the checkpoint's own image processor.

Per frame, from an HxWx3 uint8 RGB array to ``pixel_values``: ``Blip2Captioner.preprocess``
(uint8 to the device, antialiased resize there, one multiply-add) against
``processor.image_processor(frame)`` of the same checkpoint, at 640x480, 1280x720 and
1920x1080, on the CPU and, when torch sees one, on a CUDA GPU. The checkpoint is a tiny BLIP-2
built here whose image processor has the published checkpoints' settings (224 px, bicubic,
CLIP mean and std): preprocessing does not depend on the model's size.

Goal: at least 5x faster than the image processor at 1920x1080 on the CPU, with the output
within one uint8 level (after normalisation) of the reference.
"""

import tempfile

import common

SIZES = ((480, 640), (720, 1280), (1080, 1920))
GOAL_SPEEDUP_1080P = 5.0


def camera_like_frame(height, width):
    """Smooth colour gradients with sharp-edged blocks: what a camera sees, plus hard edges."""
    import numpy as np
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    rows /= height
    columns /= width
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = np.clip(128 + 100 * np.sin(6 * columns + 2 * rows), 0, 255)
    frame[..., 1] = np.clip(128 + 100 * np.cos(5 * rows), 0, 255)
    frame[..., 2] = np.where(((columns * 16).astype(int) + (rows * 9).astype(int)) % 2, 220, 30)
    return frame


def build_checkpoint(folder):
    """Build a tiny BLIP-2 whose image processor matches the published checkpoints'."""
    from training.tiny_blip2 import build_tiny_blip2
    return build_tiny_blip2(folder, image_size=224, patch_size=14)


def measure(captioner, device_label, repeats, sizes=SIZES):
    """Time node path and reference on one captioner's device; return one row per size."""
    import torch

    image_processor = captioner.processor.image_processor
    device = captioner.device
    synchronize = torch.cuda.synchronize if device.type == 'cuda' else None
    # Smallest channel std: one uint8 level is largest there after normalisation.
    level = (1.0 / 255.0) / min(image_processor.image_std)
    rows = []
    for height, width in sizes:
        frame = camera_like_frame(height, width)

        def node_path():
            return captioner.preprocess([frame])

        def reference():
            pixel_values = image_processor(frame, return_tensors='pt')['pixel_values']
            return pixel_values.to(device)

        node_ms = common.summary(common.time_calls(node_path, repeats, synchronize=synchronize))
        reference_ms = common.summary(
            common.time_calls(reference, repeats, synchronize=synchronize))
        difference = (node_path().float().cpu() - reference().float().cpu()).abs()
        rows.append({
            'device': device_label, 'frame': f'{width}x{height}',
            'node_ms_p50': node_ms['p50'], 'reference_ms_p50': reference_ms['p50'],
            'speedup': reference_ms['p50'] / node_ms['p50'],
            'max_abs_diff': float(difference.max()),
            'max_diff_levels': float(difference.max()) / level,
            'mean_diff_levels': float(difference.mean()) / level,
            'node_ms': node_ms, 'reference_ms': reference_ms,
            'reference_class': type(image_processor).__name__,
        })
    return rows


def goals_for(rows):
    """Judge the CPU rows against the goal."""
    goals = []
    for row in rows:
        if row['device'] == 'cpu' and row['frame'] == '1920x1080':
            goals.append(common.goal(
                f'node preprocessing >= {GOAL_SPEEDUP_1080P:g}x the image processor at '
                '1920x1080 on CPU',
                row['speedup'] >= GOAL_SPEEDUP_1080P,
                f"{row['speedup']:.1f}x ({row['node_ms_p50']:.2f} ms vs "
                f"{row['reference_ms_p50']:.2f} ms p50)"))
    worst = max(row['max_diff_levels'] for row in rows)
    goals.append(common.goal(
        'output within 1 uint8 level of the reference (all sizes and devices)',
        worst <= 1.0 + 1e-3, f'largest difference {worst:.3f} levels'))
    return goals


COLUMNS = [('device', 'device'), ('frame', 'frame'), ('node_ms_p50', 'node path ms (p50)'),
           ('reference_ms_p50', 'image processor ms (p50)'), ('speedup', 'speed-up'),
           ('max_abs_diff', 'max abs diff'), ('max_diff_levels', 'max diff (uint8 levels)'),
           ('mean_diff_levels', 'mean diff (levels)')]


def main(argv=None):
    """Run the benchmark, print the table and goals, write JSON."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0],
                                    'a few repeats per size instead of 30 (smoke run)')
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import torch
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig

    repeats = 5 if args.quick else 30
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        build_checkpoint(folder)
        devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
        for device in devices:
            captioner = Blip2Captioner(CaptionerConfig(model=folder, device=device))
            rows.extend(measure(captioner, device, repeats))
    goals = goals_for(rows)
    print(f'Preprocessing, one frame to 224x224 pixel_values, {repeats} timed calls per cell; '
          f"reference: {rows[0]['reference_class']}; torch threads: {torch.get_num_threads()}")
    print(common.table(rows, COLUMNS))
    print()
    print(common.goals_table(goals))
    return common.finish({'benchmark': 'preprocess', 'machine': common.machine_info(),
                          'repeats': repeats, 'rows': rows, 'goals': goals}, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
