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
GPU memory through load, caption and release, as the lifecycle node's configure and cleanup do.

blip2-opt-2.7b with random weights is saved as a checkpoint, loaded through the captioner
(``quantization`` none and int8), used for one caption, then released the way
``CaptionNode._release_model`` releases it (drop the captioner, ``gc.collect``,
``torch.cuda.empty_cache``). Prints allocated and device-free memory at each step; the check
is that allocated memory returns to its value before the load and the device gets the
memory back.

    python3 benchmarks/gpu_release_check.py          # about a minute on an H200
"""

import gc
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshot(torch, label):
    """Return allocated and device-free GiB now."""
    free, _ = torch.cuda.mem_get_info()
    return {'step': label, 'allocated_gib': round(torch.cuda.memory_allocated() / 2**30, 3),
            'device_free_gib': round(free / 2**30, 2)}


def main():
    """Load, caption, release; print the memory at each step as JSON."""
    import bench_gpu
    import numpy as np
    import torch

    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig

    rows = []
    frame = np.zeros((480, 640, 3), np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        processor = bench_gpu.build_processor('opt', False)
        model = bench_gpu.build_model('opt', False, processor, torch.device('cuda'))
        bench_gpu.to_bfloat16(model)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        for quantization in ('none', 'int8'):
            rows.append(snapshot(torch, f'{quantization}: before load'))
            captioner = Blip2Captioner(CaptionerConfig(model=folder, device='cuda',
                                                       quantization=quantization))
            captioner.caption([frame])
            rows.append(snapshot(torch, f'{quantization}: loaded, captioned'))
            del captioner
            gc.collect()
            torch.cuda.empty_cache()
            rows.append(snapshot(torch, f'{quantization}: released'))
            print(json.dumps(rows[-3:]), flush=True)
    out = os.environ.get('OUT')
    if out:
        with open(os.path.join(out, 'gpu_release_check.json'), 'w') as stream:
            json.dump(rows, stream, indent=2)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
