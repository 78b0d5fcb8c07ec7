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

"""training.export_merged: a LoRA run's adapter becomes a whole model that captions the same."""

import json

from blip2_ros.captioner import (Blip2Captioner, CaptionerConfig, TRAINING_INFO_FILE,
                                 training_prompt)
import numpy as np
import torch
from training.export_merged import main


def test_merged_model_captions_as_base_plus_adapter_with_the_training_prompt(
        lively_opt_checkpoint, tmp_path):
    from peft import get_peft_model, LoraConfig
    from transformers import Blip2ForConditionalGeneration

    adapter = tmp_path / 'lora-run'
    model = Blip2ForConditionalGeneration.from_pretrained(lively_opt_checkpoint)
    # The targets training.train gives a LoRA on the whole BLIP-2.
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=r'.*language_model.*\.(q_proj|v_proj)'))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if 'lora_B' in name:  # zero at first: the adapter would change nothing
                parameter.normal_(0.0, 0.5, generator=generator)
    peft_model.save_pretrained(adapter)
    (adapter / TRAINING_INFO_FILE).write_text(json.dumps(
        {'prompt': 'a photo of', 'method': 'lora', 'base_model': str(lively_opt_checkpoint)}))

    merged = tmp_path / 'merged'
    assert main(['--adapter', str(adapter), '--output', str(merged)]) == 0

    def captions(**options):
        config = CaptionerConfig(device='cpu', dtype='float32', max_new_tokens=8, **options)
        return Blip2Captioner(config).caption(frames, prompt='a photo of')

    frames = list(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    expected = captions(model=str(lively_opt_checkpoint), adapter=str(adapter))
    assert captions(model=str(merged)) == expected
    assert captions(model=str(lively_opt_checkpoint)) != expected
    assert not (merged / 'adapter_config.json').exists()
    assert training_prompt(str(merged)) == 'a photo of'
