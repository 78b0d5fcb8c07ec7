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
The vLLM server (scripts/serve_vllm.py): it captions as the project's own captioner does.

The server runs once per session (test/vllm_server.py); frames go to it as the robot sends
them, resized to the model's image size and PNG-encoded (lossless) in a data URL.
"""

import base64
import io
import json
import subprocess

import numpy as np
from PIL import Image
import pytest
from vllm_server import API_KEY, serve_command

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 12


def frames(size):
    """Eight different frames: plain colours, gradients, stripes, a checkerboard and noise."""
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    gradient = (255 * columns / (width - 1)).astype(np.uint8)
    stripes = np.where((rows // 4) % 2 == 0, 230, 20).astype(np.uint8)
    checkerboard = np.where((rows // 8 + columns // 8) % 2 == 0, 255, 0).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    return [
        np.full((height, width, 3), (200, 30, 30), np.uint8),
        np.full((height, width, 3), (20, 160, 60), np.uint8),
        np.zeros((height, width, 3), np.uint8),
        np.stack([gradient, gradient[::-1], stripes], axis=-1),
        np.stack([stripes, gradient, gradient], axis=-1),
        np.stack([checkerboard] * 3, axis=-1),
        *noise,
    ]


def data_url(frame):
    """Return the frame as a PNG data URL, as the robot sends it."""
    encoded = io.BytesIO()
    Image.fromarray(frame).save(encoded, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(encoded.getvalue()).decode('ascii')


@pytest.fixture(scope='module')
def local_captioner(vllm_server):
    """Return the project's own captioner on the checkpoint the server serves."""
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    return Blip2Captioner(CaptionerConfig(model=str(vllm_server.checkpoint), device='cpu',
                                          dtype='float32'))


@pytest.mark.parametrize('prompt', ['', 'a photo of'])
def test_chat_completion_captions_equal_the_local_captioners(vllm_server, local_captioner,
                                                             prompt):
    import openai

    images = frames(local_captioner.image_size)
    expected = local_captioner.caption(images, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
    # Equal captions would also come from a server that ignored the image.
    assert len(set(expected)) >= 6, expected
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key=API_KEY, max_retries=0,
                           timeout=60)
    served = []
    for image in images:
        content = [{'type': 'image_url', 'image_url': {'url': data_url(image)}}]
        if prompt:
            content.append({'type': 'text', 'text': prompt})
        answer = client.chat.completions.create(
            model=vllm_server.model_name, messages=[{'role': 'user', 'content': content}],
            max_tokens=MAX_NEW_TOKENS, temperature=0.0)
        # After a prompt that ends in a word, the first generated token carries its space.
        served.append(answer.choices[0].message.content.lstrip())
    assert served == expected


@pytest.mark.parametrize('checkpoint', ['flan_t5', 'lora_adapter'])
def test_serve_script_refuses_what_vllm_cannot_serve_in_one_line(checkpoint, tiny_t5_checkpoint,
                                                                 tmp_path):
    if checkpoint == 'flan_t5':
        model, expected = tiny_t5_checkpoint, 'Flan-T5'
    else:
        model, expected = tmp_path, 'python -m training.export_merged'
        (tmp_path / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA'}))
    command, environment = serve_command(model, '--port', '1')
    result = subprocess.run(command, env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
