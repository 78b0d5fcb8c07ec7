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

"""The OpenVINO backend: conversion, its cache on disk, captions equal to the local backend's."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

from blip2_ros import caption_images
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, make_captioner
from blip2_ros.checkpoint import ModelLoadError
import numpy as np
import pytest

CONVERTING = 'to OpenVINO'


@pytest.fixture(scope='module', autouse=True)
def cache_home(tmp_path_factory):
    """Keep this module's converted models in a folder of its own."""
    saved = os.environ.get('XDG_CACHE_HOME')
    folder = tmp_path_factory.mktemp('xdg-cache')
    os.environ['XDG_CACHE_HOME'] = str(folder)
    yield folder
    if saved is None:
        del os.environ['XDG_CACHE_HOME']
    else:
        os.environ['XDG_CACHE_HOME'] = saved


@pytest.fixture(scope='module')
def frames():
    """Random frames of several sizes: the captions of the lively checkpoint differ by frame."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48 + 8 * index, 64, 3), np.uint8) for index in range(5)]


def openvino_captioner(model, **options):
    """Load ``model`` through make_captioner with backend openvino."""
    options.setdefault('max_new_tokens', 10)
    return make_captioner(CaptionerConfig(model=str(model), backend='openvino', **options))


@pytest.fixture(scope='module')
def lively_openvino(lively_opt_checkpoint):
    """Return the lively OPT checkpoint on the OpenVINO backend, fp32."""
    return openvino_captioner(lively_opt_checkpoint)


@pytest.fixture(scope='module')
def lively_local(lively_opt_checkpoint):
    """Return the same checkpoint on the local backend, on the CPU in float32."""
    return Blip2Captioner(CaptionerConfig(model=str(lively_opt_checkpoint), device='cpu',
                                          dtype='float32', max_new_tokens=10))


def converted_files(folder):
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


def test_make_captioner_gives_the_openvino_backend_with_the_local_surface(lively_openvino,
                                                                          cache_home):
    captioner = lively_openvino
    assert captioner.backend == 'openvino'
    assert str(captioner.device) == 'cpu' and captioner.compile_decode is False
    assert captioner.fast_preprocessing and captioner.image_size == (64, 64)
    assert captioner.weights == 'fp32' and captioner.converted_now
    assert os.path.dirname(captioner.cache_folder) == str(cache_home / 'blip2_ros' / 'openvino')
    assert captioner.length_problem('', 10) is None
    assert 'max_new_tokens 200' in captioner.length_problem('', 200)
    captioner.warm_up((1, 2))
    assert captioner.caption([]) == []


@pytest.mark.parametrize('prompt', ['', 'a photo of'])
def test_fp32_captions_equal_the_local_backends(lively_openvino, lively_local, frames, prompt):
    batched = lively_openvino.caption(frames, prompt=prompt)
    assert batched == lively_local.caption(frames, prompt=prompt)
    assert len(set(batched)) > 2  # the test would prove nothing if every caption were alike
    one_by_one = [lively_openvino.caption([frame], prompt=prompt)[0] for frame in frames]
    assert one_by_one == [lively_local.caption([frame], prompt=prompt)[0] for frame in frames]


def test_a_prompt_per_frame_and_a_caption_length_give_the_local_captions(
        lively_openvino, lively_local, frames):
    prompts = ['', 'a photo of', 'what is on the belt', 'the', 'a']
    assert (lively_openvino.caption(frames, prompt=prompts, max_new_tokens=4)
            == lively_local.caption(frames, prompt=prompts, max_new_tokens=4))


def test_the_conversion_is_reused_and_redone_when_the_weights_change(
        tiny_opt_checkpoint, tmp_path, caplog):
    model = tmp_path / 'opt'
    shutil.copytree(tiny_opt_checkpoint, model)
    with caplog.at_level(logging.INFO, logger='blip2_ros.openvino_captioner'):
        first = openvino_captioner(model)
    assert first.converted_now and CONVERTING in caplog.text and 'converted' in caplog.text
    folder = first.cache_folder
    written = converted_files(type(tmp_path)(folder))
    caplog.clear()

    with caplog.at_level(logging.INFO, logger='blip2_ros.openvino_captioner'):
        second = openvino_captioner(model)
    assert not second.converted_now and CONVERTING not in caplog.text
    assert second.cache_folder == folder
    assert converted_files(type(tmp_path)(folder)) == written

    # A checkpoint saved again (same size, new time) must never be served the old graphs.
    weights = model / 'model.safetensors'
    status = weights.stat()
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    third = openvino_captioner(model)
    assert third.converted_now and third.cache_folder != folder
    assert third.caption([np.zeros((64, 64, 3), np.uint8)]) == first.caption(
        [np.zeros((64, 64, 3), np.uint8)])


def test_int8_weights_caption_from_a_cache_of_their_own(lively_opt_checkpoint, lively_openvino,
                                                        frames):
    captioner = openvino_captioner(lively_opt_checkpoint, openvino_weights='int8')
    assert captioner.weights == 'int8' and captioner.cache_folder != lively_openvino.cache_folder
    assert '-int8-' in os.path.basename(captioner.cache_folder)
    captions = captioner.caption(frames)
    assert len(captions) == len(frames) and all(isinstance(text, str) for text in captions)


def test_a_flan_t5_checkpoint_is_refused_in_one_line(tiny_t5_checkpoint, cache_home):
    before = set(os.listdir(cache_home / 'blip2_ros' / 'openvino'))
    with pytest.raises(ModelLoadError) as raised:
        openvino_captioner(tiny_t5_checkpoint)
    message = str(raised.value)
    assert '\n' not in message and 'OPT' in message and 'backend local' in message
    assert set(os.listdir(cache_home / 'blip2_ros' / 'openvino')) == before


@pytest.mark.parametrize('options, expected', [
    ({'openvino_weights': 'int4'}, "unknown openvino_weights 'int4'"),
    ({'device': 'cuda'}, 'runs on the CPU'),
    ({'dtype': 'bfloat16'}, 'computes in float32'),
    ({'quantization': 'int8'}, 'use openvino_weights int8'),
    ({'torch_compile': True}, 'torch_compile'),
    ({'max_new_tokens': 0}, 'max_new_tokens must be 1 or more'),
])
def test_settings_it_cannot_honour_are_refused_in_one_line(tiny_opt_checkpoint, options,
                                                           expected):
    with pytest.raises(ModelLoadError, match=expected) as raised:
        openvino_captioner(tiny_opt_checkpoint, **options)
    assert '\n' not in str(raised.value)


def test_a_bad_checkpoint_gets_the_loaders_one_line(tmp_path):
    (tmp_path / 'config.json').write_text('{"model_type": "blip-2"')
    with pytest.raises(ModelLoadError) as raised:
        openvino_captioner(tmp_path)
    assert '\n' not in str(raised.value)
    with pytest.raises(ModelLoadError, match='no such folder'):
        openvino_captioner(tmp_path / 'missing')


def test_caption_images_backend_openvino(lively_opt_checkpoint, lively_local, frames, tmp_path,
                                         capsys):
    import cv2
    for index, frame in enumerate(frames):
        assert cv2.imwrite(str(tmp_path / f'{index}.png'), frame[:, :, ::-1])
    status = caption_images.main(['--model', str(lively_opt_checkpoint), '--backend',
                                  'openvino', '--max-new-tokens', '10', str(tmp_path)])
    out, _ = capsys.readouterr()
    assert status == 0
    captions = [json.loads(line)['caption'] for line in out.splitlines()]
    assert captions == lively_local.caption(frames)


def test_the_environment_has_openvino_and_nncf_and_no_torchvision_that_breaks_torch():
    # The test command installs requirements-ml.txt from PyPI. A package that pulls a CUDA
    # torchvision beside the CPU torch (optimum-intel does) breaks `import torchvision`, and
    # transformers' image code with it.
    import nncf  # noqa: F401
    import openvino  # noqa: F401
    if importlib.util.find_spec('torchvision') is not None:
        check = subprocess.run([sys.executable, '-c', 'import torchvision'],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr.strip().splitlines()[-1]
