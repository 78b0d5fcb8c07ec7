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
The captioner's ``quantization: int8`` on a CPU: weight memory, speed and caption agreement.

Through the project's own loader (``Blip2Captioner`` with ``quantization='int8'``: torchao
weight-only int8 after loading) against float32, in one process:

* the demo model on 200 frames of a scene stream it never saw: how often the int8 caption
  equals the float32 one and the truth, and the caption metrics of training/evaluate.py of
  the int8 captions against the float32 ones;
* a BLIP-2 of small but realistic shape with random weights (ViT 384 x 6 at 224 px, Q-Former
  384 x 4 with 32 queries, OPT 512 x 6, vocabulary 50272): weight bytes and batch-1 latency of
  a 20-token caption.

    .venv/bin/python benchmarks/bench_quantization_cpu.py     # about 2 minutes on 2 cores
"""

import os
import statistics
import sys
import tempfile
import time

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weight_bytes(model):
    """Return the bytes the model's parameters hold, a quantized tensor's parts as stored."""
    import torch
    total = 0
    for parameter in model.parameters():
        if hasattr(parameter, '__tensor_flatten__'):  # torchao: int8 data and its scales
            names = parameter.__tensor_flatten__()[0]
            parts = [getattr(parameter, name) for name in names]
            total += sum(part.numel() * part.element_size() for part in parts
                         if isinstance(part, torch.Tensor))
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def realistic_checkpoint(folder):
    """Save the realistic-shape BLIP-2 with random weights; return its folder."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor,
                              OPTConfig)
    from training.tiny_blip2 import build_tokenizer

    tokenizer = build_tokenizer([f'w{index}' for index in range(50200)], 'opt')
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=384, intermediate_size=1536,
                                        num_hidden_layers=6, num_attention_heads=6,
                                        image_size=224, patch_size=16).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=384, intermediate_size=1536,
                                          num_hidden_layers=4, num_attention_heads=6,
                                          encoder_hidden_size=384).to_dict(),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=512, ffn_dim=2048,
                              num_hidden_layers=6, num_attention_heads=8,
                              word_embed_proj_dim=512, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id).to_dict(),
        num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids('<image>'))
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={'height': 224, 'width': 224}),
                   tokenizer=tokenizer, num_query_tokens=32).save_pretrained(folder)
    return folder


def main(argv=None):
    """Run the benchmark; print tables and JSON."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0], 'fewer frames')
    args = parser.parse_args(argv)
    common.quiet_libraries()
    import numpy as np
    import torch

    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    from blip2_ros.demo.run import demo_model_path, recorded_frame_size
    from blip2_ros.demo.synthetic_factory import scene_at
    from training.evaluate import score_captions

    torch.set_num_threads(1)
    count = 40 if args.quick else 200
    width, height = recorded_frame_size(demo_model_path())
    scenes = [scene_at(7, index, (height, width)) for index in range(count)]
    frames = [scene.image for scene in scenes]
    results = {'machine': common.machine_info(), 'demo_model': {}, 'realistic': []}
    captions = {}
    for quantization in ('none', 'int8'):
        captioner = Blip2Captioner(CaptionerConfig(
            model=demo_model_path(), device='cpu', dtype='float32', quantization=quantization))
        captions[quantization] = [captioner.caption(frames[start:start + 8])
                                  for start in range(0, count, 8)]
        captions[quantization] = [text for batch in captions[quantization] for text in batch]
        results['demo_model'][quantization] = {
            'exact_match_vs_truth': sum(a == s.caption for a, s in zip(
                captions[quantization], scenes)) / count}
    results['demo_model']['int8']['agreement_with_float32'] = sum(
        a == b for a, b in zip(captions['int8'], captions['none'])) / count
    scores = score_captions({index: [text] for index, text in enumerate(captions['none'])},
                            dict(enumerate(captions['int8'])))
    results['demo_model']['int8']['metrics_vs_float32'] = dict(scores.scores)
    print(results['demo_model'], flush=True)

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        realistic_checkpoint(folder)
        for quantization in ('none', 'int8'):
            captioner = Blip2Captioner(CaptionerConfig(
                model=folder, device='cpu', dtype='float32', quantization=quantization))
            captioner.caption([frame], min_new_tokens=20, max_new_tokens=20)
            times = []
            for _ in range(3 if args.quick else 8):
                started = time.perf_counter()
                captioner.caption([frame], min_new_tokens=20, max_new_tokens=20)
                times.append((time.perf_counter() - started) * 1000.0)
            row = {'quantization': quantization,
                   'weight_mib': weight_bytes(captioner.model) / 2**20,
                   'latency_ms_p50': statistics.median(times)}
            results['realistic'].append(row)
            print(row, flush=True)
            del captioner
    print(common.table(results['realistic'], ['quantization', 'weight_mib', 'latency_ms_p50']))
    return common.finish(results, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
