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

from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, training_prompt
import numpy as np
from training.export_merged import main
from vllm_server import build_lora_training_output


def test_merged_model_captions_as_base_plus_adapter_with_the_training_prompt(
        lively_opt_checkpoint, tmp_path):
    adapter = build_lora_training_output(lively_opt_checkpoint, tmp_path / 'lora-run',
                                         std=0.5, seed=5, prompt='a photo of')

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
