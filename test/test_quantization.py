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

"""8- and 4-bit weights: int8 (torchao) captions on the CPU, and clear refusals."""

import json
import os

from blip2_ros import caption_images
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from blip2_ros.checkpoint import ModelLoadError
from blip2_ros.demo.run import demo_model_path, recorded_frame_size
from blip2_ros.demo.synthetic_factory import scene_at
import cv2
import pytest


@pytest.fixture(scope='module')
def demo_scenes():
    """Frames of the demo model's factory that it never saw, with their true captions."""
    width, height = recorded_frame_size(demo_model_path())
    return [scene_at(7, index, (height, width)) for index in range(40)]


def captioner(model, **options):
    """Load ``model`` on the CPU in float32 with ``options``."""
    return Blip2Captioner(CaptionerConfig(model=str(model), device='cpu', dtype='float32',
                                          **options))


def test_int8_weights_caption_the_demo_frames_as_the_float32_model_does(demo_scenes):
    full = captioner(demo_model_path())
    eight_bit = captioner(demo_model_path(), quantization='int8')
    layer = eight_bit.model.language_model.model.decoder.layers[0].self_attn.q_proj
    assert 'Int8' in type(layer.weight).__name__, type(layer.weight)
    frames = [scene.image for scene in demo_scenes]
    expected = full.caption(frames)
    captions = eight_bit.caption(frames)
    agreement = sum(a == b for a, b in zip(captions, expected)) / len(frames)
    truth = sum(a == scene.caption for a, scene in zip(captions, demo_scenes)) / len(frames)
    assert agreement >= 0.9 and truth >= 0.9, (agreement, truth)


@pytest.mark.parametrize('quantization, expected', [
    ('int4', 'needs a CUDA GPU'), ('int3', "unknown quantization 'int3'")])
def test_quantization_that_cannot_work_is_refused_in_one_line(
        tiny_opt_checkpoint, quantization, expected):
    with pytest.raises(ModelLoadError) as raised:
        captioner(tiny_opt_checkpoint, quantization=quantization)
    assert expected in str(raised.value) and '\n' not in str(raised.value)


def test_caption_images_takes_quantization(tmp_path, capsys):
    scene = scene_at(8, 0, (120, 160))
    cv2.imwrite(str(tmp_path / 'frame.png'), scene.image[:, :, ::-1])
    status = caption_images.main(['--model', demo_model_path(), '--device', 'cpu',
                                  '--quantization', 'int8', str(tmp_path)])
    assert status == caption_images.EXIT_OK
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)['image'] == os.path.join(str(tmp_path), 'frame.png')
    assert json.loads(line)['caption'] == scene.caption
