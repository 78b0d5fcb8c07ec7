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

"""Shared fixtures: an isolated DDS domain, tiny BLIP-2 checkpoints, a vLLM server."""

from blip2_ros.demo.isolation import claim_domain_id, isolate_ros
import pytest
# A session fixture: one vLLM server for every test file that asks for it.
from vllm_server import vllm_server  # noqa: F401


# Set before any test imports rclpy, so every node created in this process (and every child
# process, which inherits the environment) stays on loopback in a domain of its own, which no
# parallel test run or demo on this machine shares.
isolate_ros(claim_domain_id(), large_frames_profile=False)


@pytest.fixture
def one_torch_thread():
    """Run torch on one thread, as torch_threads=1 does in the node."""
    import torch
    # With other work on a 2-core machine, two-thread kernels wait for time slices: the
    # captioner tests took 100 s instead of 7 s beside a training run.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope='session')
def tiny_opt_checkpoint(tmp_path_factory):
    """Save a tiny, randomly initialised BLIP-2 with an OPT decoder and return its folder."""
    from training.tiny_blip2 import build_tiny_blip2
    folder = tmp_path_factory.mktemp('tiny-blip2-opt')
    build_tiny_blip2(folder, language_model='opt', seed=0)
    return folder


@pytest.fixture(scope='session')
def tiny_t5_checkpoint(tmp_path_factory):
    """Save a tiny, randomly initialised BLIP-2 with a Flan-T5 encoder-decoder and return it."""
    from training.tiny_blip2 import build_tiny_blip2
    folder = tmp_path_factory.mktemp('tiny-blip2-t5')
    build_tiny_blip2(folder, language_model='t5', seed=0)
    return folder


def save_lively_copy(source, destination, seed=1, talkative=False):
    """
    Copy a tiny checkpoint with larger random weights.

    At the builder's small init every frame and prompt gets the same (empty) caption, which
    would let wrong padding, a lost adapter or a frame/caption mix-up go unnoticed; with
    weights of std 0.3 the captions depend on the image and the prompt.

    Even so, about one frame in three still gets an empty caption, because greedy decoding
    picks a special token (pad, end) first. ``talkative`` zeroes the output-embedding rows of
    the special tokens, so they are never the best pick and every frame gets a caption with
    words: for tests that count captions, now that an empty caption is a failure.
    """
    import shutil

    import torch
    from transformers import Blip2ForConditionalGeneration

    shutil.copytree(source, destination)
    model = Blip2ForConditionalGeneration.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3, generator=generator)
        if talkative:
            from training.tiny_blip2 import never_pick_special_tokens
            from transformers import AutoTokenizer
            never_pick_special_tokens(model, AutoTokenizer.from_pretrained(source))
    model.save_pretrained(destination)
    return destination


@pytest.fixture
def harness_factory():
    """Return a function that starts a ros_harness.Harness; each one is closed after the test."""
    from ros_harness import Harness
    harnesses = []

    def make(*args, **kwargs):
        harnesses.append(Harness(*args, **kwargs))
        return harnesses[-1]
    yield make
    for harness in harnesses:
        harness.close()


@pytest.fixture(scope='session')
def lively_opt_checkpoint(tiny_opt_checkpoint, tmp_path_factory):
    """Return a tiny OPT BLIP-2 whose captions depend on the image and the prompt."""
    return save_lively_copy(tiny_opt_checkpoint, tmp_path_factory.mktemp('lively') / 'opt')


@pytest.fixture(scope='session')
def talkative_opt_checkpoint(tiny_opt_checkpoint, tmp_path_factory):
    """Return a lively tiny OPT BLIP-2 that never gives an empty caption."""
    return save_lively_copy(
        tiny_opt_checkpoint, tmp_path_factory.mktemp('talkative') / 'opt', talkative=True)


@pytest.fixture(scope='session')
def lively_t5_checkpoint(tiny_t5_checkpoint, tmp_path_factory):
    """Return a tiny Flan-T5 BLIP-2 whose captions depend on the image and the prompt."""
    return save_lively_copy(tiny_t5_checkpoint, tmp_path_factory.mktemp('lively') / 't5')


# A checkpoint's own model class, as a hub repository with code ships it: it proves it ran.
MARKED_MODEL_CODE = '''from transformers import Blip2ForConditionalGeneration


class MarkedBlip2(Blip2ForConditionalGeneration):
    """A checkpoint's own class."""

    ran_checkpoint_code = True
'''


@pytest.fixture
def code_of_its_own(tmp_path):
    """
    Return a function that copies a checkpoint and makes it name code of its own (auto_map).

    ``code`` goes to modeling_marked.py; ``auto_map`` names its ``MarkedBlip2`` class by default.
    """
    import json
    import shutil

    def make(checkpoint, name='remote-code', code=MARKED_MODEL_CODE,
             auto_map=(('AutoModelForImageTextToText', 'modeling_marked.MarkedBlip2'),)):
        folder = tmp_path / name
        shutil.copytree(checkpoint, folder)
        (folder / 'modeling_marked.py').write_text(code)
        config = json.loads((folder / 'config.json').read_text())
        config['auto_map'] = dict(auto_map)
        (folder / 'config.json').write_text(json.dumps(config))
        return folder
    return make
