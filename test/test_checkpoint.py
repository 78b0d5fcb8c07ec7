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

"""The checkpoint loader: what a model path means, and the checkpoints it refuses, in one line."""

import json
import os
import shutil
import sys

from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from blip2_ros.checkpoint import (ModelLoadError, one_line, tokenizer_problem,
                                  TRAINING_INFO_FILE, training_prompt)
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch
from transformers import Blip2ForConditionalGeneration


def load(model, **settings):
    return Blip2Captioner(CaptionerConfig(model=str(model), device='cpu', **settings))


def refusal(model, **settings):
    """Return the one-line message loading ``model`` is refused with."""
    with pytest.raises(ModelLoadError) as error:
        load(model, **settings)
    message = str(error.value)
    assert '\n' not in message and message == message.strip()
    return message


def copy_without(checkpoint, folder, *names):
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(*names))
    return folder


def test_one_line_joins_lines_and_cuts_at_the_limit():
    assert one_line(ValueError('first\n  second\tthird')) == 'first second third'
    assert one_line(KeyError()) == 'KeyError'
    cut = one_line('word ' * 100, limit=40)
    assert len(cut) == 40 and cut.endswith('...')


def test_a_weight_missing_from_the_file_is_refused_naming_it(tiny_opt_checkpoint, tmp_path):
    # from_pretrained would initialise the layer at random and load without an error.
    folder = copy_without(tiny_opt_checkpoint, tmp_path / 'incomplete')
    weights = load_file(folder / 'model.safetensors')
    removed = sorted(name for name in weights if name.startswith('language_model.'))[3]
    del weights[removed]
    save_file(weights, folder / 'model.safetensors', metadata={'format': 'pt'})
    message = refusal(folder)
    assert removed in message and 'incomplete' in message and 'random' in message, message


def test_a_dropped_shard_is_refused_naming_it(tiny_opt_checkpoint, tmp_path):
    folder = copy_without(tiny_opt_checkpoint, tmp_path / 'sharded', '*.safetensors')
    Blip2ForConditionalGeneration.from_pretrained(tiny_opt_checkpoint).save_pretrained(
        folder, max_shard_size='1MB')
    shards = sorted(name for name in os.listdir(folder) if name.endswith('.safetensors'))
    assert len(shards) > 1
    assert len(load(folder, max_new_tokens=2).caption([torch.zeros(64, 64, 3).byte().numpy()]))
    os.remove(folder / shards[-1])
    message = refusal(folder)
    assert f'are missing ({shards[-1]})' in message and 'model.safetensors.index.json' in message


def test_a_path_to_a_file_says_it_is_a_file(tiny_opt_checkpoint):
    path = tiny_opt_checkpoint / 'model.safetensors'
    message = refusal(path)
    assert f'{path} is a file, not a checkpoint folder' in message
    assert 'no such folder' not in message


def test_a_folder_with_only_a_config_names_what_is_missing(tiny_opt_checkpoint, tmp_path):
    folder = tmp_path / 'config-only'
    folder.mkdir()
    shutil.copy(tiny_opt_checkpoint / 'config.json', folder)
    message = refusal(folder)
    assert f'no weights and no processor files in {folder}' in message
    assert 'model.safetensors' in message and 'save_pretrained' in message
    assert not message.endswith('...')


def test_a_folder_without_weights_does_not_hint_at_pickle(tiny_opt_checkpoint, tmp_path):
    folder = copy_without(tiny_opt_checkpoint, tmp_path / 'no-weights', '*.safetensors')
    message = refusal(folder)
    assert f'no weights in {folder}' in message and 'model.safetensors' in message
    assert 'pickle' not in message and 'allow_pickle' not in message


def test_a_checkpoint_that_needs_its_own_code_is_refused_naming_the_opt_in(
        tiny_opt_checkpoint, code_of_its_own):
    folder = code_of_its_own(tiny_opt_checkpoint)
    modules = set(sys.modules)
    message = refusal(folder)
    assert str(folder) in message and 'auto_map' in message
    assert 'trust_remote_code:=true' in message and '--trust-remote-code' in message
    # Refused before its code ran: nothing of it was imported.
    assert not [name for name in set(sys.modules) - modules if 'modeling_marked' in name]


def test_trust_remote_code_loads_the_checkpoints_own_class_with_its_weights(
        talkative_opt_checkpoint, code_of_its_own):
    folder = code_of_its_own(talkative_opt_checkpoint)
    trusted = load(folder, trust_remote_code=True, max_new_tokens=6)
    assert type(trusted.model).__name__ == 'MarkedBlip2' and trusted.model.ran_checkpoint_code
    plain = load(talkative_opt_checkpoint, max_new_tokens=6)
    frames = [np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
              for seed in range(3)]
    assert trusted.caption(frames) == plain.caption(frames)
    assert all(trusted.caption(frames))


@pytest.mark.parametrize('code, expected', [
    ('class MarkedBlip2:\n    pass\n',
     'its own code makes MarkedBlip2, which does not build on Blip2ForConditionalGeneration'),
    ("raise RuntimeError('this code refuses to run')\n",
     'its own code (modeling_marked.MarkedBlip2) does not load: this code refuses to run'),
])
def test_trusted_code_that_cannot_caption_is_refused_in_one_line(
        tiny_opt_checkpoint, code_of_its_own, code, expected):
    folder = code_of_its_own(tiny_opt_checkpoint, code=code)
    message = refusal(folder, trust_remote_code=True)
    assert str(folder) in message and expected in message, message


def test_trust_remote_code_still_wants_a_blip2_config(tiny_opt_checkpoint, code_of_its_own):
    folder = code_of_its_own(tiny_opt_checkpoint)
    config = json.loads((folder / 'config.json').read_text())
    config['model_type'] = 'opt'
    (folder / 'config.json').write_text(json.dumps(config))
    assert "model_type 'opt', so it is not BLIP-2" in refusal(folder, trust_remote_code=True)


def test_a_model_path_with_a_tilde_is_the_home_folder(tiny_opt_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    shutil.copytree(tiny_opt_checkpoint, tmp_path / 'models' / 'tiny')
    with open(tmp_path / 'models' / 'tiny' / TRAINING_INFO_FILE, 'w', encoding='utf-8') as stream:
        json.dump({'prompt': 'a photo of'}, stream)
    captioner = load('~/models/tiny', max_new_tokens=2)
    assert isinstance(captioner.model, Blip2ForConditionalGeneration)
    assert training_prompt('~/models/tiny') == 'a photo of'
    assert str(tmp_path / 'no-such') in refusal('~/no-such')


def test_an_adapter_path_with_a_tilde_is_the_home_folder(
        tiny_opt_checkpoint, tmp_path, monkeypatch):
    from peft import get_peft_model, LoraConfig
    monkeypatch.setenv('HOME', str(tmp_path))
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt_checkpoint)
    peft_model = get_peft_model(model.language_model,
                                LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if 'lora_B' in name:
                parameter.fill_(0.5)
    peft_model.save_pretrained(tmp_path / 'adapter')
    base = load(tiny_opt_checkpoint).model
    adapted = load(tiny_opt_checkpoint, adapter='~/adapter').model
    name = 'language_model.model.decoder.layers.0.self_attn.q_proj.weight'
    assert not torch.equal(base.state_dict()[name], adapted.state_dict()[name])
    (tmp_path / 'adapter-file').write_text('')
    assert 'is a file, not a folder' in refusal(tiny_opt_checkpoint, adapter='~/adapter-file')


class StubTokenizer:
    def __init__(self, size, pad_token):
        self.size, self.pad_token = size, pad_token

    def __len__(self):
        return self.size


class StubTextConfig:
    vocab_size = 50272


def test_a_tokenizer_far_smaller_than_its_model_is_refused():
    # What transformers makes from a hub checkpoint whose tokenizer files are missing.
    problem = tokenizer_problem(StubTokenizer(2, None), StubTextConfig())
    assert 'no pad token' in problem and 'tokenizer.json' in problem
    assert tokenizer_problem(StubTokenizer(50265, '<pad>'), StubTextConfig()) is None
