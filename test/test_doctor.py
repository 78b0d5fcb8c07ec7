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

"""The environment doctor: what it reports on this machine, and its exit status."""

import json
import os
import shutil
import subprocess
import sys

from blip2_ros.doctor import main
import pytest
import torch
import transformers
from transformers import Blip2ForConditionalGeneration, OPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def run_doctor(capsys, *argv):
    """Run the doctor in this process; return its exit status and report lines."""
    status = main(list(argv))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'blip2_ros doctor'
    for line in lines[1:-1]:
        assert line.split()[0] in ('OK', 'WARN', 'MISSING'), line
    return status, lines


def line_about(lines, text):
    """Return the one report line that contains ``text``."""
    found = [line for line in lines if text in line]
    assert len(found) == 1, (text, lines)
    return found[0]


def test_reports_this_machine_and_exits_0(capsys):
    status, lines = run_doctor(capsys)
    assert status == 0
    assert lines[-1].startswith('everything the caption node needs is here')
    assert line_about(lines, '(inference)') == f'OK      torch {torch.__version__} (inference)'
    assert line_about(lines, 'transformers').startswith(
        f'OK      transformers {transformers.__version__}')
    rclpy_line = line_about(lines, 'rclpy')
    assert rclpy_line.startswith('OK') and f"RMW {os.environ['RMW_IMPLEMENTATION']}" in rclpy_line
    assert f"ROS_DOMAIN_ID {os.environ['ROS_DOMAIN_ID']}" in rclpy_line
    assert line_about(lines, 'message packages').startswith('OK')
    cuda_line = line_about(lines, 'CUDA')
    assert cuda_line.startswith('OK' if torch.cuda.is_available() else 'WARN')
    if not torch.cuda.is_available():
        assert '->' in cuda_line, 'a missing GPU comes with its fix'
    cv_bridge_line = line_about(lines, 'cv_bridge')
    if cv_bridge_line.startswith('WARN'):
        assert 'blip2_ros.image_conversion' in cv_bridge_line
    java_line = line_about(lines, 'Java')
    assert java_line.startswith('OK' if shutil.which('java') else 'WARN')


def test_a_missing_node_dependency_gives_missing_and_exit_1(capsys, monkeypatch):
    # None in sys.modules makes the import fail exactly as on a machine without the package.
    monkeypatch.setitem(sys.modules, 'rclpy', None)
    monkeypatch.setitem(sys.modules, 'sensor_msgs.msg', None)
    status, lines = run_doctor(capsys)
    assert status == 1
    assert line_about(lines, 'rclpy not importable').startswith('MISSING')
    assert 'pip install -r requirements.txt' in line_about(lines, 'rclpy not importable')
    assert line_about(lines, 'message packages').startswith('MISSING')
    assert lines[-1].startswith('2 missing')


def test_optional_packages_are_only_warnings(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'peft', None)
    monkeypatch.setitem(sys.modules, 'pycocoevalcap', None)
    status, lines = run_doctor(capsys)
    assert status == 0
    assert line_about(lines, 'peft').startswith('WARN')
    assert line_about(lines, 'pycocoevalcap').startswith('WARN')


def test_local_model_folder_reports_parameters_and_memory(capsys, tiny_opt_checkpoint):
    status, lines = run_doctor(capsys, '--model', str(tiny_opt_checkpoint))
    assert status == 0
    model_line = line_about(lines, f"model '{tiny_opt_checkpoint}'")
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_opt_checkpoint)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert model_line.startswith('OK') and '(local folder)' in model_line
    assert f'{parameters / 1e6:,.1f}M parameters' in model_line and 'with opt' in model_line
    assert f'float32 {parameters * 4 / GIB:.2f} GiB' in model_line
    assert f'bfloat16/float16 {parameters * 2 / GIB:.2f} GiB' in model_line


def test_missing_model_folder_exits_1_and_names_it(capsys, tmp_path):
    missing = tmp_path / 'no-such-model'
    status, lines = run_doctor(capsys, '--model', str(missing))
    assert status == 1
    assert line_about(lines, str(missing)).startswith(
        f"MISSING model folder '{missing}' does not exist ->")


def test_folder_that_is_not_a_usable_blip2(capsys, tmp_path, tiny_opt_checkpoint):
    other = tmp_path / 'opt-only'
    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
              vocab_size=50).save_pretrained(other)
    status, lines = run_doctor(capsys, '--model', str(other))
    assert status == 1
    assert "model_type 'opt', so it is not BLIP-2" in line_about(lines, str(other))

    no_weights = tmp_path / 'config-only'
    no_weights.mkdir()
    for name in os.listdir(tiny_opt_checkpoint):
        if 'safetensors' not in name:
            shutil.copy(tiny_opt_checkpoint / name, no_weights / name)
    status, lines = run_doctor(capsys, '--model', str(no_weights))
    assert status == 1
    assert 'no complete weights' in line_about(lines, str(no_weights))


def test_damaged_or_incomplete_weights_are_missing(capsys, tmp_path, tiny_opt_checkpoint):
    truncated = tmp_path / 'truncated'
    shutil.copytree(tiny_opt_checkpoint, truncated)
    weights = truncated / 'model.safetensors'
    with open(weights, 'r+b') as stream:
        stream.truncate(os.path.getsize(weights) // 2)  # as an interrupted download leaves it
    status, lines = run_doctor(capsys, '--model', str(truncated))
    assert status == 1
    line = line_about(lines, str(truncated))
    assert line.startswith('MISSING') and 'model.safetensors is damaged' in line

    sharded = tmp_path / 'sharded'
    shutil.copytree(tiny_opt_checkpoint, sharded, ignore=shutil.ignore_patterns('*.safetensors'))
    Blip2ForConditionalGeneration.from_pretrained(tiny_opt_checkpoint).save_pretrained(
        sharded, max_shard_size='1MB')
    shards = sorted(name for name in os.listdir(sharded) if name.endswith('.safetensors'))
    assert len(shards) > 1 and (sharded / 'model.safetensors.index.json').is_file()
    status, lines = run_doctor(capsys, '--model', str(sharded))
    assert status == 0 and line_about(lines, str(sharded)).startswith('OK')

    os.remove(sharded / shards[-1])
    status, lines = run_doctor(capsys, '--model', str(sharded))
    assert status == 1
    line = line_about(lines, str(sharded))
    assert line.startswith('MISSING') and f'are missing ({shards[-1]})' in line


def fill_hub_cache(cache, repo_id, checkpoint, skip=()):
    """Lay a checkpoint out as the Hugging Face hub cache does (snapshot folder + refs/main)."""
    revision = '0123456789abcdef0123456789abcdef01234567'
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    for name in os.listdir(checkpoint):
        if name not in skip:
            shutil.copy(checkpoint / name, snapshot / name)


def test_hub_id_found_in_the_local_cache(capsys, tmp_path, tiny_opt_checkpoint):
    cache = tmp_path / 'hub'
    fill_hub_cache(cache, 'factory/tiny-blip2', tiny_opt_checkpoint)
    status, lines = run_doctor(capsys, '--model', 'factory/tiny-blip2', '--local-files-only',
                               '--cache-dir', str(cache))
    assert status == 0
    model_line = line_about(lines, "model 'factory/tiny-blip2'")
    assert model_line.startswith('OK') and 'in the local Hugging Face cache' in model_line

    fill_hub_cache(cache, 'factory/no-weights', tiny_opt_checkpoint,
                   skip=('model.safetensors',))
    status, lines = run_doctor(capsys, '--model', 'factory/no-weights', '--local-files-only',
                               '--cache-dir', str(cache))
    assert status == 1
    assert line_about(lines, "'factory/no-weights'").startswith('MISSING')

    status, lines = run_doctor(capsys, '--model', 'factory/never-downloaded',
                               '--local-files-only', '--cache-dir', str(cache))
    assert status == 1
    never = line_about(lines, "'factory/never-downloaded'")
    assert never.startswith('MISSING') and 'not in the local Hugging Face cache' in never
    assert 'hf download factory/never-downloaded' in never


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'blip2_ros.doctor', '--model', str(tmp_path / 'absent')],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == 'blip2_ros doctor' and len(lines) >= 15
    assert any(line.startswith('MISSING model folder') for line in lines)
    assert str(tmp_path / 'absent') in result.stdout


def test_a_node_dependency_that_does_not_import_is_missing_not_a_warning(capsys, monkeypatch):
    # transformers goes through the same check as torch, numpy, OpenCV and Pillow.
    monkeypatch.setitem(sys.modules, 'transformers', None)
    status, lines = run_doctor(capsys)
    assert status == 1
    line = line_about(lines, 'transformers not importable')
    assert line.startswith('MISSING') and 'pip install -r requirements-ml.txt' in line
    assert lines[-1].startswith('1 missing')


@pytest.mark.parametrize('removed', [('processor_config.json',),
                                     ('tokenizer.json', 'tokenizer_config.json')])
def test_a_model_folder_without_its_processor_files_is_missing(capsys, tmp_path,
                                                               tiny_opt_checkpoint, removed):
    folder = tmp_path / 'weights-only'
    shutil.copytree(tiny_opt_checkpoint, folder)
    for name in removed:
        os.remove(folder / name)
    status, lines = run_doctor(capsys, '--model', str(folder))
    assert status == 1
    line = line_about(lines, f"model '{folder}'")
    assert line.startswith('MISSING') and 'lacks its processor files' in line


def test_a_model_with_code_of_its_own_is_a_warning_naming_the_opt_in(
        capsys, tiny_opt_checkpoint, code_of_its_own):
    folder = code_of_its_own(tiny_opt_checkpoint)
    status, lines = run_doctor(capsys, '--model', str(folder))
    assert status == 0  # it loads once trusted: a warning, not a missing piece
    assert line_about(lines, f"model '{folder}' (local folder): BLIP-2").startswith('OK')
    line = line_about(lines, f"model '{folder}' names code of its own")
    assert line.startswith('WARN') and 'trust_remote_code:=true' in line, line

    status, lines = run_doctor(capsys, '--model', str(tiny_opt_checkpoint))
    assert not [line for line in lines if 'code of its own' in line]


def test_a_model_too_big_for_this_machine_is_a_warning(capsys, tmp_path, tiny_opt_checkpoint):
    # The weights stay tiny; the config claims a vocabulary that makes about 10**12 parameters,
    # which the doctor counts on the meta device: more than any GPU or RAM holds.
    folder = tmp_path / 'huge'
    shutil.copytree(tiny_opt_checkpoint, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['text_config']['vocab_size'] = 2 ** 40 // config['text_config']['hidden_size']
    (folder / 'config.json').write_text(json.dumps(config))
    status, lines = run_doctor(capsys, '--model', str(folder))
    assert status == 0  # it may run somewhere else: a warning, not a missing piece
    assert line_about(lines, f"model '{folder}'").startswith('OK')
    fits = line_about(lines, 'the model needs about')
    assert fits.startswith('WARN') and 'more than' in fits and '->' in fits

    status, lines = run_doctor(capsys, '--model', str(tiny_opt_checkpoint))
    assert not [line for line in lines if 'the model needs about' in line]


def test_torch_compile_line_names_the_compiler_and_the_kept_folder(capsys, monkeypatch,
                                                                   tmp_path):
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    status, lines = run_doctor(capsys)
    assert status == 0
    kind = 'C compiler' if torch.cuda.is_available() else 'C++ compiler'
    line = line_about(lines, 'torch_compile')
    assert line.startswith(f'OK      torch_compile: {kind} /'), line
    assert line.endswith(f"kept in {tmp_path / 'cache' / 'blip2_ros' / 'torch_compile'}")
    assert not (tmp_path / 'cache').exists(), 'the doctor checks, it does not create folders'


def test_torch_compile_without_a_compiler_or_a_writable_folder_is_a_warning(
        capsys, monkeypatch, tmp_path):
    (tmp_path / 'not-a-folder').write_text('')
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'not-a-folder'))
    monkeypatch.setenv('PATH', str(tmp_path))  # no compiler on it
    status, lines = run_doctor(capsys)
    assert status == 0, 'torch_compile is optional'
    compiler, folder = [line for line in lines if 'torch_compile' in line]
    assert compiler.startswith('WARN    torch_compile: no C') and 'apt install' in compiler
    assert 'decodes uncompiled' in compiler
    assert folder.startswith(f"WARN    torch_compile: cannot write {tmp_path / 'not-a-folder'}")
    assert 'TORCHINDUCTOR_CACHE_DIR' in folder
