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

"""training.train on tiny BLIP-2 checkpoints: methods, labels, resume, signals, torchrun."""

import json
import os
from pathlib import Path
import re
import shutil
import signal
import subprocess
import sys
import time

from blip2_ros.captioner import (Blip2Captioner, CaptionerConfig, ModelLoadError,
                                 training_prompt)
from blip2_ros.demo.synthetic_factory import iter_scenes, SceneSpec
import numpy as np
from PIL import Image
import pytest
from safetensors.torch import load_file
import torch
from training import checkpoints, train
from training.data import CaptionCollator, IGNORE_INDEX, load_rgb

REPO = Path(__file__).resolve().parents[1]
# Captions whose every word is in the tiny checkpoints' base vocabulary ('two red boxes on the
# conveyor'), so no caption token is <unk>.
BOX_SPEC = SceneSpec(kinds=('box',))
LEARNING_STEPS = 600
# One thread: tiny models train many times faster on a busy CPU (see --cpu_threads).
FAST = ['--cpu_threads', '1', '--report_to', 'none', '--disable_tqdm', 'true',
        '--per_device_train_batch_size', '4',
        '--logging_steps', '1', '--eval_strategy', 'no', '--save_steps', '1000',
        '--dataloader_pin_memory', 'false']


def write_dataset(folder, train_count, val_count, seed=0, spec=BOX_SPEC):
    """Write synthetic factory frames as a dataset folder with train and val splits."""
    (folder / 'images').mkdir(parents=True)
    coco = {'info': {}, 'licenses': [], 'images': [], 'annotations': []}
    splits = {'train': [], 'val': []}
    for index, scene in enumerate(iter_scenes(train_count + val_count, seed=seed, spec=spec)):
        name = f'frame_{index:05d}.png'
        Image.fromarray(scene.image).save(folder / 'images' / name)
        height, width = scene.image.shape[:2]
        coco['images'].append({'id': index + 1, 'file_name': name, 'width': width,
                               'height': height})
        coco['annotations'].append({'id': index + 1, 'image_id': index + 1,
                                    'caption': scene.caption})
        split = 'train' if index < train_count else 'val'
        splits[split].append({'image_id': index + 1, 'file_name': name,
                              'captions': [scene.caption]})
    (folder / 'annotations.json').write_text(json.dumps(coco))
    for split, rows in splits.items():
        (folder / f'{split}_split.jsonl').write_text(
            ''.join(json.dumps(row) + '\n' for row in rows))
    return folder


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """32 training and 8 validation frames of the synthetic factory."""
    return write_dataset(tmp_path_factory.mktemp('factory'), 32, 8)


def run_train(model, data, output_dir, method, *extra):
    """Call train.main in this process; return its exit status."""
    return train.main(['--model', str(model), '--data', str(data), '--output_dir',
                       str(output_dir), '--method', method, *FAST, *extra])


def expected_trainable(names, method, language_model):
    """Return the parameter names that ``method`` must train, from first principles."""
    if method == 'full':
        return set(names)
    if method == 'qformer':
        return {name for name in names
                if name.startswith(('qformer.', 'query_tokens', 'language_projection.'))}
    projections = r'(q_proj|v_proj)' if language_model == 'opt' else r'(q|v)'
    pattern = re.compile(r'base_model\.model\.language_model\..*\.' + projections
                         + r'\.lora_[AB]\.default\.weight')
    return {name for name in names if pattern.fullmatch(name)}


def load_weights(folder):
    """Return the tensors of a saved model folder."""
    return load_file(os.path.join(folder, 'model.safetensors'))


@pytest.mark.parametrize('language_model', ['opt', 't5'])
@pytest.mark.parametrize('method', ['qformer', 'lora', 'full'])
def test_method_trains_exactly_its_parameters_and_output_loads(
        request, tmp_path, dataset, language_model, method):
    """Each method sets the right parameters trainable, changes only those, and loads back."""
    base = request.getfixturevalue(f'tiny_{language_model}_checkpoint')
    parsed = train.parse_arguments(['--model', str(base), '--data', str(dataset),
                                    '--output_dir', str(tmp_path / 'unused'),
                                    '--method', method, '--use_cpu', 'true'])
    model, _ = train.load_model(parsed[0], parsed[2])
    model = train.apply_method(model, parsed[0])
    names = [name for name, _ in model.named_parameters()]
    trainable = {name for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    assert trainable == expected_trainable(names, method, language_model)
    assert trainable  # a method that trains nothing is a bug

    output = tmp_path / 'out'
    assert run_train(base, dataset, output, method, '--max_steps', '3',
                     '--learning_rate', '1e-3', '--prompt', 'a photo of') == 0
    info = json.loads((output / train.TRAINING_INFO_FILE).read_text())
    assert info['prompt'] == 'a photo of' and info['method'] == method
    before = load_weights(base)
    frame = load_rgb(dataset / 'images' / 'frame_00000.png')

    if method == 'lora':
        adapter = load_file(output / 'adapter_model.safetensors')
        assert adapter and all('lora_' in key and '.language_model.' in key for key in adapter)
        assert all(adapter[key].abs().sum() > 0 for key in adapter if 'lora_B' in key)
        captioner = Blip2Captioner(CaptionerConfig(model=str(base), adapter=str(output),
                                                   max_new_tokens=5))
        merged = captioner.model.state_dict()
        adapted = expected_trainable(names, method, language_model)
        adapted_weights = {re.sub(r'^base_model\.model\.|\.lora_[AB]\.default', '', name)
                           for name in adapted}
        for name, tensor in before.items():
            if name in adapted_weights:
                assert not torch.equal(merged[name], tensor), name
            else:
                assert torch.equal(merged[name], tensor), name
    else:
        after = load_weights(output)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed <= trainable
        # Frozen weights are bit-identical; the trained groups all moved.
        groups = {name.split('.')[0] for name in changed}
        wanted = {'qformer', 'query_tokens', 'language_projection'}
        if method == 'full':
            wanted |= {'vision_model', 'language_model'}
        assert groups == wanted
        captioner = Blip2Captioner(CaptionerConfig(model=str(output), max_new_tokens=5))
        assert torch.equal(captioner.model.language_projection.weight,
                           after['language_projection.weight'])
    captions = captioner.caption([frame], prompt='a photo of')
    assert len(captions) == 1 and isinstance(captions[0], str)


@pytest.mark.parametrize('language_model,method', [('opt', 'full'), ('t5', 'qformer')])
def test_loss_goes_down(request, tmp_path, dataset, language_model, method):
    """Training steps lower the loss on the synthetic captions."""
    base = request.getfixturevalue(f'tiny_{language_model}_checkpoint')
    output = tmp_path / 'out'
    assert run_train(base, dataset, output, method, '--max_steps', '30',
                     '--learning_rate', '2e-3', '--per_device_train_batch_size', '8') == 0
    history = json.loads((output / 'trainer_state.json').read_text())['log_history']
    losses = [entry['loss'] for entry in history if 'loss' in entry]
    assert len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (first, last)


def test_collator_masks_image_prompt_and_padding(tiny_opt_checkpoint, tiny_t5_checkpoint):
    """Labels are -100 on placeholders, prompt and padding; inputs match the inference core."""
    items = [{'image': np.zeros((64, 64, 3), np.uint8), 'caption': 'two red boxes'},
             {'image': np.full((48, 80, 3), 200, np.uint8), 'caption': 'one box'}]
    for base in (tiny_opt_checkpoint, tiny_t5_checkpoint):
        captioner = Blip2Captioner(CaptionerConfig(model=str(base), prompt='a photo of'))
        config = captioner.model.config
        tokenizer = captioner.processor.tokenizer
        collator = CaptionCollator(captioner.processor, config.image_token_id,
                                   config.num_query_tokens, captioner.is_encoder_decoder,
                                   prompt='a photo of')
        batch = collator(items)
        prefix = captioner._encode_prompts(['a photo of'])[0][0].tolist()
        queries = config.num_query_tokens
        assert prefix[:queries] == [config.image_token_id] * queries
        eos = tokenizer.eos_token_id
        captions = [tokenizer('two red boxes', add_special_tokens=False)['input_ids'] + [eos],
                    tokenizer('one box', add_special_tokens=False)['input_ids'] + [eos]]
        assert batch['pixel_values'].shape == (2, 3, 64, 64)
        for row, caption in enumerate(captions):
            ids = batch['input_ids'][row].tolist()
            labels = batch['labels'][row].tolist()
            mask = batch['attention_mask'][row].tolist()
            length = sum(mask)
            assert mask == [1] * length + [0] * (len(mask) - length)
            assert ids[length:] == [tokenizer.pad_token_id] * (len(ids) - length)
            if captioner.is_encoder_decoder:
                # The encoder reads what the captioner feeds it; the decoder learns the caption.
                assert ids[:length] == prefix
                assert labels == caption + [IGNORE_INDEX] * (len(labels) - len(caption))
            else:
                assert ids[:length] == prefix + caption
                assert labels == ([IGNORE_INDEX] * len(prefix) + caption
                                  + [IGNORE_INDEX] * (len(labels) - length))
        assert batch['labels'].shape[1] == (
            max(map(len, captions)) if captioner.is_encoder_decoder
            else batch['input_ids'].shape[1])


def _trained_tensors(folder):
    return load_weights(folder)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(
        tmp_path, dataset, tiny_opt_checkpoint, caplog):
    """Stop after 3 of 6 steps, resume past two broken checkpoints: same weights as one run."""
    common = ['--max_steps', '6', '--save_steps', '3', '--learning_rate', '1e-3',
              '--seed', '7']
    straight = tmp_path / 'straight'
    assert run_train(tiny_opt_checkpoint, dataset, straight, 'full', *common) == 0

    resumed = tmp_path / 'resumed'
    assert run_train(tiny_opt_checkpoint, dataset, resumed, 'full', *common,
                     '--stop_after_steps', '3') == 0
    assert not (resumed / 'model.safetensors').exists()
    assert checkpoints.checkpoint_problem(resumed / 'checkpoint-3') == ''
    # A checkpoint cut off before its marker, and one whose weights were truncated later.
    shutil.copytree(resumed / 'checkpoint-3', resumed / 'checkpoint-4')
    (resumed / 'checkpoint-4' / checkpoints.CHECKPOINT_MARKER).unlink()
    shutil.copytree(resumed / 'checkpoint-3', resumed / 'checkpoint-5')
    weights = resumed / 'checkpoint-5' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])

    with pytest.raises(SystemExit, match='--resume'):
        run_train(tiny_opt_checkpoint, dataset, resumed, 'full', *common)
    assert run_train(tiny_opt_checkpoint, dataset, resumed, 'full', *common, '--resume') == 0

    skipped = [record.getMessage() for record in caplog.records
               if 'skipping incomplete checkpoint' in record.getMessage()]
    assert any('checkpoint-5' in message and 'model.safetensors' in message
               for message in skipped)
    assert any('checkpoint-4' in message and checkpoints.CHECKPOINT_MARKER in message
               for message in skipped)
    expected, actual = _trained_tensors(straight), _trained_tensors(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert not torch.equal(expected['language_projection.weight'],
                           load_weights(tiny_opt_checkpoint)['language_projection.weight'])


def _subprocess_environment():
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, dataset, tiny_opt_checkpoint):
    """SIGTERM mid-run: a complete checkpoint at the step it stopped, exit 143, no traceback."""
    output = tmp_path / 'out'
    command = [sys.executable, '-m', 'training.train', '--model', str(tiny_opt_checkpoint),
               '--data', str(dataset), '--output_dir', str(output), '--method', 'qformer',
               '--max_steps', '100000', *FAST]
    stderr_path = tmp_path / 'stderr.txt'
    with open(stderr_path, 'w') as stderr_file:
        # stderr goes to a file so a chatty library can never fill a pipe and stall the run.
        process = subprocess.Popen(command, cwd=REPO, env=_subprocess_environment(),
                                   stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        try:
            deadline = time.monotonic() + 120
            for line in process.stdout:
                if "'loss'" in line:
                    break
                assert time.monotonic() < deadline, 'training never logged a step'
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = stderr_path.read_text()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert 'SIGTERM received' in stderr
    assert 'Traceback' not in stderr
    match = re.search(r'stopped by SIGTERM at step (\d+)', stdout)
    assert match, stdout[-2000:]
    step = int(match.group(1))
    assert checkpoints.checkpoint_problem(output / f'checkpoint-{step}') == ''
    assert [folder for _, folder in checkpoints.list_checkpoints(output)] == [
        str(output / f'checkpoint-{step}')]

    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '100000',
                     '--resume', '--stop_after_steps', '2') == 0
    state = json.loads((output / f'checkpoint-{step + 2}' / 'trainer_state.json').read_text())
    assert state['global_step'] == step + 2


def test_two_process_torchrun_completes(tmp_path, dataset, tiny_opt_checkpoint):
    """Two processes under torchrun on the CPU (gloo) train, evaluate and save."""
    output = tmp_path / 'out'
    fast = list(FAST)
    fast[fast.index('--eval_strategy') + 1] = 'steps'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               '--nproc_per_node=2', '-m', 'training.train', '--model', str(tiny_opt_checkpoint),
               '--data', str(dataset), '--output_dir', str(output), '--method', 'qformer',
               '--max_steps', '4', *fast, '--save_steps', '2', '--eval_steps', '2',
               '--caption_eval_images', '2']
    completed = subprocess.run(command, cwd=REPO, env=_subprocess_environment(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for step in (2, 4):
        checkpoint = output / f'checkpoint-{step}'
        assert checkpoints.checkpoint_problem(checkpoint) == ''
        # One RNG state per process: both ranks took part.
        assert (checkpoint / 'rng_state_0.pth').exists()
        assert (checkpoint / 'rng_state_1.pth').exists()
    assert (output / 'model.safetensors').exists()
    evaluation = json.loads((output / 'eval_results.json').read_text())
    assert {'eval_loss', 'eval_CIDEr', 'eval_exact_match'} <= set(evaluation)
    state = json.loads((output / 'trainer_state.json').read_text())
    assert state['global_step'] == 4
    assert completed.stdout.count('saved model to') == 1


def test_tensorboard_gets_losses_metrics_images_and_captions(
        tmp_path, dataset, tiny_opt_checkpoint, monkeypatch):
    """The default report target logs train/eval loss, lr, caption metrics, images and text."""
    from blip2_ros.captioner import Blip2Captioner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The captions come from the node's own captioner, so they are what the robot would say.
    captioned = []
    caption = Blip2Captioner.caption

    def recorded_caption(captioner, frames, *args, **kwargs):
        captions = caption(captioner, frames, *args, **kwargs)
        captioned.append((captioner.config.prompt, len(frames), captions))
        return captions

    monkeypatch.setattr(Blip2Captioner, 'caption', recorded_caption)
    output = tmp_path / 'out'
    assert train.main(['--model', str(tiny_opt_checkpoint), '--data', str(dataset),
                       '--output_dir', str(output), '--method', 'lora', '--max_steps', '2',
                       '--eval_steps', '2', '--save_steps', '2', '--logging_steps', '1',
                       '--per_device_train_batch_size', '4', '--disable_tqdm', 'true',
                       '--caption_eval_images', '4', '--logged_images', '2']) == 0
    (run_dir,) = (output / 'runs').iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={'images': 0, 'tensors': 0})
    events.Reload()
    tags = events.Tags()
    assert {'train/loss', 'train/learning_rate', 'eval/loss', 'eval/CIDEr', 'eval/Bleu_4',
            'eval/exact_match'} <= set(tags['scalars'])
    assert {'val_images/0', 'val_images/1'} == set(tags['images'])
    assert 'val_captions/text_summary' in tags['tensors']
    text = events.Tensors('val_captions/text_summary')[-1].tensor_proto.string_val[0].decode()
    assert 'predicted' in text and 'on the conveyor' in text
    assert [(prompt, count) for prompt, count, _ in captioned] == [('', 4)]
    rows = text.splitlines()[2:]
    assert [row.split(' | ')[1] for row in rows] == captioned[0][2][:2]


def test_invalid_dataset_is_refused_before_the_model_loads(tmp_path, dataset):
    """A dataset that training.validate rejects stops training before any model is read."""
    broken = tmp_path / 'broken'
    shutil.copytree(dataset, broken)
    (broken / 'images' / 'frame_00003.png').unlink()
    with pytest.raises(SystemExit) as raised:
        run_train(tmp_path / 'no-such-model', broken, tmp_path / 'out', 'qformer')
    message = str(raised.value)
    assert 'frame_00003.png' in message and 'training.validate' in message
    assert 'cannot load' not in message and '\n' not in message
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


@pytest.mark.parametrize('arguments,fragment', [
    (['--method', 'qformer', '--merge_lora'], '--merge_lora only applies to --method lora'),
    (['--method', 'lora', '--load_in_4bit'], 'need'),
    (['--method', 'full', '--weights_dtype', 'bfloat16'], 'keeps float32 weights'),
    (['--method', 'sideways'], 'invalid choice'),
])
def test_bad_arguments_say_how_to_fix_them(tmp_path, dataset, arguments, fragment, capsys):
    """__post_init__ checks give one line that says what to change."""
    with pytest.raises(SystemExit) as raised:
        train.main(['--model', 'x', '--data', str(dataset), '--output_dir',
                    str(tmp_path / 'out'), *arguments])
    message = str(raised.value) + capsys.readouterr().err
    assert fragment in message


def test_config_file_gives_the_same_arguments_and_flags_after_it_win(tmp_path, dataset):
    """A YAML file parses like the flags; flags after it (the README's '--resume') override."""
    config = tmp_path / 'train.yaml'
    config.write_text(f'model: some/model\ndata: {dataset}\noutput_dir: {tmp_path / "out"}\n'
                      'method: lora\nlora_r: 4\nprompt: a photo of\nlearning_rate: 5e-4\n'
                      'max_steps: 7\n')
    model_args, data_args, training_args = train.parse_arguments([str(config)])
    assert (model_args.model, model_args.method, model_args.lora_r) == ('some/model', 'lora', 4)
    assert data_args.prompt == 'a photo of'
    assert (training_args.learning_rate, training_args.max_steps) == (0.0005, 7)
    assert training_args.report_to == ['tensorboard'] and not training_args.resume
    model_args, data_args, training_args = train.parse_arguments(
        [str(config), '--resume', '--max_steps', '9'])
    assert (model_args.model, data_args.prompt) == ('some/model', 'a photo of')
    assert training_args.resume and training_args.max_steps == 9


@pytest.mark.parametrize('text, expected', [
    ('model: some/model\nlearning_rte: 0.1\n', "unknown setting 'learning_rte'"),
    ('- model\n- data\n', 'must hold settings as "name: value" lines'),
    ('model: [some\n', 'cannot read config file'),
])
def test_a_config_file_with_a_mistake_is_refused_in_one_line(tmp_path, text, expected):
    config = tmp_path / 'train.yaml'
    config.write_text(text)
    with pytest.raises(train.TrainingError) as raised:
        train.parse_arguments([str(config)])
    assert expected in str(raised.value) and '\n' not in str(raised.value)


@pytest.mark.slow
def test_tiny_model_learns_captions_from_scratch(tmp_path, capsys):
    """
    From random weights, --method full learns what the frames show, far above chance.

    Captions are '<count> <colour> <kind>s on the conveyor' with 3 x 4 x 4 = 48 equally likely
    values, so guessing scores 1/48 (2.1%); the most common training caption is the best
    blind guess and is measured on the held-out frames too.
    """
    from blip2_ros.demo.synthetic_factory import DEFAULT_SPEC
    from training import evaluate
    from training.tiny_blip2 import build_tiny_blip2

    data = write_dataset(tmp_path / 'data', 1500, 200, seed=3, spec=DEFAULT_SPEC)
    base = build_tiny_blip2(tmp_path / 'init', 'opt', seed=0, words=DEFAULT_SPEC.vocabulary())
    output = tmp_path / 'out'
    started = time.monotonic()
    assert train.main(['--model', str(base), '--data', str(data), '--output_dir', str(output),
                       '--method', 'full', '--max_steps', str(LEARNING_STEPS),
                       '--learning_rate', '5e-4', '--warmup_steps', '100',
                       '--per_device_train_batch_size', '32', '--cache_images', 'true',
                       '--eval_strategy', 'no', '--save_strategy', 'no',
                       '--logging_steps', '50', '--report_to', 'none', '--cpu_threads', '1',
                       '--disable_tqdm', 'true', '--dataloader_pin_memory', 'false']) == 0
    train_seconds = time.monotonic() - started
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate.main(['--model', str(output), '--data', str(data), '--split', 'val',
                              '--out', str(tmp_path / 'eval'), '--tokenizer', 'simple',
                              '--metrics', 'exact_match']) == 0
    finally:
        torch.set_num_threads(threads)
    scores = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    exact = scores['models']['model']['scores']['exact_match']

    train_captions = [json.loads(line)['captions'][0]
                      for line in (data / 'train_split.jsonl').read_text().splitlines()]
    val_captions = [json.loads(line)['captions'][0]
                    for line in (data / 'val_split.jsonl').read_text().splitlines()]
    blind_guess = max(set(train_captions), key=train_captions.count)
    blind_rate = val_captions.count(blind_guess) / len(val_captions)
    chance = DEFAULT_SPEC.chance_level
    with capsys.disabled():
        print(f'\nexact match {exact:.1%} on {len(val_captions)} held-out frames after '
              f'{LEARNING_STEPS} steps ({train_seconds:.0f} s); chance {chance:.1%}, '
              f'best blind guess {blind_rate:.1%}')
    assert exact >= 5 * max(chance, blind_rate)


def test_16_bit_frozen_weights_train_with_autocast(tmp_path, dataset, tiny_opt_checkpoint):
    """bfloat16 frozen weights (the GPU default for qformer/lora) train beside float32 ones."""
    output = tmp_path / 'out'
    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '2',
                     '--weights_dtype', 'bfloat16') == 0
    after = load_weights(output)
    assert after['language_model.model.decoder.layers.0.fc1.weight'].dtype == torch.bfloat16
    assert after['language_projection.weight'].dtype == torch.float32
    before = load_weights(tiny_opt_checkpoint)
    assert not torch.equal(after['language_projection.weight'],
                           before['language_projection.weight'])


def test_explicit_resume_refuses_an_incomplete_checkpoint(tmp_path, dataset, tiny_opt_checkpoint):
    """--resume_from_checkpoint checks the checkpoint as --resume does, then resumes a good one."""
    output = tmp_path / 'out'
    common = ['--max_steps', '4', '--save_steps', '2']
    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common,
                     '--stop_after_steps', '2') == 0
    # Without its optimizer and scheduler a resume would restart AdamW and the LR schedule.
    broken = tmp_path / 'copied' / 'checkpoint-2'
    shutil.copytree(output / 'checkpoint-2', broken)
    (broken / 'optimizer.pt').unlink()
    with pytest.raises(SystemExit) as raised:
        run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common,
                  '--resume_from_checkpoint', str(broken))
    message = str(raised.value)
    assert str(broken) in message and 'optimizer.pt is missing' in message
    assert '\n' not in message
    assert not (output / 'checkpoint-4').exists()
    with pytest.raises(SystemExit, match='is not a folder'):
        run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common,
                  '--resume_from_checkpoint', str(tmp_path / 'nowhere'))

    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common,
                     '--resume_from_checkpoint', str(output / 'checkpoint-2')) == 0
    assert json.loads((output / 'trainer_state.json').read_text())['global_step'] == 4


def _record_weight_saves(monkeypatch):
    """Return {folder: files it held} filled in as each model save begins writing weights."""
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration

    present = {}
    for model_class in (Blip2ForConditionalGeneration, PeftModel):
        def recording_save(self, save_directory, *args, _original=model_class.save_pretrained,
                           **kwargs):
            folder = os.path.abspath(save_directory)
            present[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            return _original(self, save_directory, *args, **kwargs)
        monkeypatch.setattr(model_class, 'save_pretrained', recording_save)
    return present


@pytest.mark.parametrize('method,extra', [('qformer', []), ('lora', ['--merge_lora'])])
def test_checkpoints_and_model_folders_hold_the_training_prompt_and_are_readable(
        tmp_path, dataset, tiny_opt_checkpoint, monkeypatch, method, extra):
    """
    Every checkpoint records the training prompt, and a model folder has it before its weights.

    Evaluating or deploying a checkpoint must caption with the prompt it was trained with, and a
    run killed while saving must not leave weights that look complete but lack that prompt.
    """
    present = _record_weight_saves(monkeypatch)
    output = tmp_path / 'out'
    umask = os.umask(0o022)
    try:
        assert run_train(tiny_opt_checkpoint, dataset, output, method, '--max_steps', '2',
                         '--save_steps', '1', '--prompt', 'a photo of', *extra) == 0
    finally:
        os.umask(umask)
    for step in (1, 2):
        checkpoint = output / f'checkpoint-{step}'
        # How the node, caption_images and training.evaluate find the prompt of a folder.
        assert training_prompt(str(checkpoint)) == 'a photo of'
        marker = json.loads((checkpoint / checkpoints.CHECKPOINT_MARKER).read_text())
        assert train.TRAINING_INFO_FILE in marker['files']
        assert checkpoints.checkpoint_problem(checkpoint) == ''
    folders = [output] + ([output / 'merged'] if '--merge_lora' in extra else [])
    checkpoint_folders = [output / 'checkpoint-1', output / 'checkpoint-2']
    for folder in folders:
        assert train.TRAINING_INFO_FILE in present[str(folder)], folder
        assert training_prompt(str(folder)) == 'a photo of'
    for folder in folders + checkpoint_folders:
        # A node running as another user can read the weights, as it can the rest.
        weights = list(folder.glob('*.safetensors'))
        assert weights, folder
        for path in weights:
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_stop_after_steps_at_the_last_step_saves_the_model(
        tmp_path, dataset, tiny_opt_checkpoint, capsys):
    """A step budget that ends with the schedule finishes the run instead of asking to resume."""
    output = tmp_path / 'out'
    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '3',
                     '--stop_after_steps', '3', '--prompt', 'a photo of') == 0
    stdout = capsys.readouterr().out
    assert 'stopped by' not in stdout and f'saved model to {output}' in stdout
    assert (output / 'model.safetensors').exists()
    assert training_prompt(str(output)) == 'a photo of'


def test_evaluating_on_trained_images_warns(
        tmp_path, dataset, tiny_opt_checkpoint, caplog, capsys):
    """--train_split all still evaluates on val, but says the scores are not held out."""
    evaluate_each_step = ['--max_steps', '1', '--eval_strategy', 'steps', '--eval_steps', '1',
                          '--caption_eval_images', '0']
    assert run_train(tiny_opt_checkpoint, dataset, tmp_path / 'held_out', 'qformer',
                     *evaluate_each_step) == 0
    assert not [record for record in caplog.records if 'also in training' in record.message]
    assert 'not held-out' not in capsys.readouterr().out

    assert run_train(tiny_opt_checkpoint, dataset, tmp_path / 'all', 'qformer',
                     *evaluate_each_step, '--train_split', 'all') == 0
    (warning,) = [record for record in caplog.records if 'also in training' in record.message]
    assert warning.levelname == 'WARNING'
    assert "8 of 8 eval images of split 'val'" in warning.message
    assert '\n' not in warning.message
    summary = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith('train loss')]
    assert len(summary) == 1 and 'eval_loss' in summary[0] and 'not held-out' in summary[0]


# Signals from inside a training step, sent in a process of its own: the test run's own
# process carries threads of every earlier test (DDS, OpenMP, servers' clients).
SIGNAL_SCRIPT = """
import os, signal, sys
from training import checkpoints, train
sent = int(sys.argv[1])

def send_signals(self, args, state, control, **kwargs):
    if state.global_step == (state.max_steps - 1 if sent == 1 else 1):
        for _ in range(sent):
            os.kill(os.getpid(), signal.SIGTERM)

checkpoints.GracefulStopCallback.on_step_begin = send_signals
previous = signal.getsignal(signal.SIGTERM)
try:
    status = train.main(sys.argv[2:])
except KeyboardInterrupt:
    status = 'KeyboardInterrupt'
print('status', status, 'handler restored', signal.getsignal(signal.SIGTERM) == previous)
"""


def run_train_with_signals(signals, model, data, output_dir, *extra):
    """Run training in a child process that signals itself; return (stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, '-c', SIGNAL_SCRIPT, str(signals), '--model', str(model),
         '--data', str(data), '--output_dir', str(output_dir), '--method', 'qformer',
         *FAST, *extra],
        cwd=REPO, env=_subprocess_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def test_sigterm_in_the_last_step_finishes_the_run(tmp_path, dataset, tiny_opt_checkpoint):
    """A signal during the last step lets the run save its model instead of asking to resume."""
    output = tmp_path / 'out'
    stdout, stderr = run_train_with_signals(1, tiny_opt_checkpoint, dataset, output,
                                            '--max_steps', '3')
    assert 'status 0 handler restored True' in stdout, stdout[-2000:]
    assert 'SIGTERM received' in stderr and 'SIGTERM came in the last step' in stderr
    assert f'saved model to {output}' in stdout
    assert (output / 'model.safetensors').exists()


def test_a_second_signal_stops_at_once_without_saving(tmp_path, dataset, tiny_opt_checkpoint):
    """Ctrl-C twice: no checkpoint, no model, and the handlers from before are back."""
    output = tmp_path / 'out'
    stdout, stderr = run_train_with_signals(2, tiny_opt_checkpoint, dataset, output,
                                            '--max_steps', '5', '--save_steps', '1')
    assert 'status KeyboardInterrupt handler restored True' in stdout, stderr[-2000:]
    assert [step for step, _ in checkpoints.list_checkpoints(output)] == [1]
    assert not (output / 'model.safetensors').exists()


def test_lora_target_modules_choose_the_adapted_projections(
        tmp_path, dataset, tiny_opt_checkpoint):
    """--lora_target_modules replaces the default q_proj,v_proj; unknown names are refused."""
    def trainable(targets):
        model_args, _, training_args = train.parse_arguments([
            '--model', str(tiny_opt_checkpoint), '--data', str(dataset), '--output_dir',
            str(tmp_path / 'unused'), '--method', 'lora', '--use_cpu', 'true',
            '--lora_target_modules', targets])
        model, _ = train.load_model(model_args, training_args)
        model = train.apply_method(model, model_args)
        return {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    names = trainable(' k_proj, out_proj ')
    pattern = re.compile(r'base_model\.model\.language_model\..*\.(k_proj|out_proj)'
                         r'\.lora_[AB]\.default\.weight')
    assert names and all(pattern.fullmatch(name) for name in names), sorted(names)
    adapted = {name.split('.lora_')[0].rsplit('.', 1)[1] for name in names}
    assert adapted == {'k_proj', 'out_proj'}
    with pytest.raises(train.TrainingError, match='matched no module'):
        trainable('no_such_proj')


def test_resuming_a_finished_run_is_refused_until_the_schedule_grows(
        tmp_path, dataset, tiny_opt_checkpoint):
    """The Trainer would train one step past the end and overwrite the saved model."""
    output = tmp_path / 'out'
    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '2',
                     '--save_steps', '2') == 0
    weights = (output / 'model.safetensors').read_bytes()
    with pytest.raises(SystemExit) as raised:
        run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '2',
                  '--save_steps', '2', '--resume')
    assert 'checkpoint-2 is the end of its run (step 2 of 2)' in str(raised.value)
    assert (output / 'model.safetensors').read_bytes() == weights
    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', '--max_steps', '3',
                     '--save_steps', '2', '--resume') == 0
    assert json.loads((output / 'trainer_state.json').read_text())['global_step'] == 3


def test_a_run_cut_after_its_last_checkpoint_is_finished_by_resume_without_training(
        tmp_path, dataset, tiny_opt_checkpoint, monkeypatch, capsys):
    """Ctrl-C while the model is saved: --resume saves the last checkpoint's LoRA instead."""
    output = tmp_path / 'out'
    common = ['--max_steps', '2', '--save_steps', '2']
    write_training_info = train.write_training_info

    def interrupted_in_the_final_save(folder, info):
        if Path(folder) == output:
            raise KeyboardInterrupt
        write_training_info(folder, info)

    with monkeypatch.context() as patch:
        patch.setattr(train, 'write_training_info', interrupted_in_the_final_save)
        with pytest.raises(KeyboardInterrupt):
            run_train(tiny_opt_checkpoint, dataset, output, 'lora', *common)
    assert checkpoints.saved_weights(output) == [] and (output / 'checkpoint-2').is_dir()
    trained = load_file(output / 'checkpoint-2' / 'adapter_model.safetensors')
    capsys.readouterr()
    assert run_train(tiny_opt_checkpoint, dataset, output, 'lora', *common, '--resume') == 0
    assert f"finished from {output / 'checkpoint-2'} after 2 steps" in capsys.readouterr().out
    assert not (output / 'checkpoint-3').exists()  # Trainer.train would have made a step 3
    assert json.loads((output / 'trainer_state.json').read_text())['global_step'] == 2
    saved = load_file(output / 'adapter_model.safetensors')
    assert saved.keys() == trained.keys() and all(
        torch.equal(saved[name], trained[name]) for name in trained)
    assert json.loads((output / 'train_results.json').read_text())['epoch'] > 0
    assert Blip2Captioner(CaptionerConfig(model=str(tiny_opt_checkpoint), adapter=str(output),
                                          max_new_tokens=4)).caption(
        [np.zeros((32, 32, 3), np.uint8)])
    # Once the model is saved, the run is over: resuming it again is refused as before.
    with pytest.raises(SystemExit, match='is the end of its run'):
        run_train(tiny_opt_checkpoint, dataset, output, 'lora', *common, '--resume')


def test_a_folder_named_datasets_is_named_before_training(
        tmp_path, monkeypatch, dataset, tiny_opt_checkpoint):
    # `python -m training.train` puts the current directory first on sys.path.
    (tmp_path / 'datasets').mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as raised:
        run_train(tiny_opt_checkpoint, dataset, tmp_path / 'out', 'qformer', '--max_steps', '1')
    message = str(raised.value)
    assert str(tmp_path / 'datasets') in message and 'rename that folder' in message
    assert not (tmp_path / 'out').exists()


def assert_one_line(message, *fragments):
    """Check that the message is one line and names every fragment."""
    assert '\n' not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'


def test_pickle_weights_are_refused_unless_allowed(tmp_path, dataset, tiny_opt_checkpoint):
    """A base with only pytorch_model.bin: one line naming --allow_pickle; with it, it loads."""
    base = tmp_path / 'opt-bin'
    shutil.copytree(tiny_opt_checkpoint, base)
    weights = load_file(base / 'model.safetensors')
    os.remove(base / 'model.safetensors')
    # transformers 5 ignores safe_serialization=False, so write the legacy file by hand.
    torch.save(weights, base / 'pytorch_model.bin')
    with pytest.raises(SystemExit) as raised:
        run_train(base, dataset, tmp_path / 'out', 'qformer', '--max_steps', '1')
    assert_one_line(str(raised.value), str(base), '--allow_pickle')
    assert not (tmp_path / 'out' / 'model.safetensors').exists()

    model_args, _, training_args = train.parse_arguments([
        '--model', str(base), '--data', str(dataset), '--output_dir', str(tmp_path / 'unused'),
        '--use_cpu', 'true', '--allow_pickle', 'true'])
    model, _ = train.load_model(model_args, training_args)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in weights.items())


def test_a_base_that_needs_its_own_code_is_refused_without_the_opt_in(
        tmp_path, dataset, tiny_opt_checkpoint, code_of_its_own):
    """config.json with auto_map: refused in one line naming the opt-in; nothing is written."""
    base = code_of_its_own(tiny_opt_checkpoint, auto_map=(
        ('AutoModelForVision2Seq', 'modeling_marked.MarkedBlip2'),))
    with pytest.raises(SystemExit) as raised:
        run_train(base, dataset, tmp_path / 'out', 'qformer', '--max_steps', '1')
    assert_one_line(str(raised.value), str(base), 'auto_map', '--trust-remote-code')
    assert not (tmp_path / 'out').exists()


def test_a_trusted_base_trains_with_its_own_class_and_its_code_goes_with_the_model(
        tmp_path, dataset, tiny_opt_checkpoint, code_of_its_own):
    """--trust_remote_code: its class trains, and the saved model loads it again (trusted only)."""
    base = code_of_its_own(tiny_opt_checkpoint, auto_map=(
        ('AutoModelForVision2Seq', 'modeling_marked.MarkedBlip2'),))
    output = tmp_path / 'out'
    assert run_train(base, dataset, output, 'qformer', '--max_steps', '1',
                     '--trust_remote_code', 'true') == 0
    assert (output / 'modeling_marked.py').read_text() == (base / 'modeling_marked.py').read_text()
    trained = Blip2Captioner(CaptionerConfig(model=str(output), device='cpu',
                                             trust_remote_code=True))
    assert type(trained.model).__name__ == 'MarkedBlip2'
    assert not torch.equal(trained.model.state_dict()['language_projection.weight'],
                           load_weights(base)['language_projection.weight'])
    with pytest.raises(ModelLoadError, match='trust_remote_code:=true'):
        Blip2Captioner(CaptionerConfig(model=str(output), device='cpu'))


def test_rotation_keeps_the_newest_and_the_best_checkpoint_and_drops_incomplete_ones(
        tmp_path, dataset, tiny_opt_checkpoint):
    """
    --save_total_limit 2 over 5 saves and a leftover cut off while saving: best + newest stay.

    The leftover sorts last by step and by time, as the Trainer's rotation orders them: there
    it would pass for the newest checkpoint and push out each one this run saves.
    """
    output = tmp_path / 'out'
    leftover = output / 'checkpoint-50'
    leftover.mkdir(parents=True)
    (leftover / 'model.safetensors').write_bytes(b'cut off')
    later = time.time() + 3600
    os.utime(leftover, (later, later))
    # No learning: every evaluation gives the same loss, so the best stays the first one.
    assert run_train(tiny_opt_checkpoint, dataset, output, 'full', '--max_steps', '5',
                     '--save_steps', '1', '--eval_strategy', 'steps', '--eval_steps', '1',
                     '--caption_eval_images', '0', '--metric_for_best_model', 'eval_loss',
                     '--learning_rate', '0', '--save_total_limit', '2', '--resume') == 0
    state = json.loads((output / 'trainer_state.json').read_text())
    assert state['best_model_checkpoint'] == str(output / 'checkpoint-1')
    assert [step for step, _ in checkpoints.list_checkpoints(output)] == [5, 1]
    for step in (5, 1):
        assert checkpoints.checkpoint_problem(output / f'checkpoint-{step}') == ''


def test_a_run_cut_before_the_marker_keeps_its_last_complete_checkpoint(
        tmp_path, dataset, tiny_opt_checkpoint, monkeypatch):
    """--save_total_limit 1: checkpoint-1 stays until checkpoint-2 is complete; resume uses it."""
    output = tmp_path / 'out'
    common = ['--max_steps', '3', '--save_steps', '1', '--save_total_limit', '1',
              '--learning_rate', '1e-3']
    write_marker = checkpoints.write_checkpoint_marker

    def killed_before_the_second_marker(folder, step):
        if step == 2:
            raise KeyboardInterrupt
        write_marker(folder, step)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, 'write_checkpoint_marker', killed_before_the_second_marker)
        with pytest.raises(KeyboardInterrupt):
            run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common)
    assert checkpoints.checkpoint_problem(output / 'checkpoint-1') == ''
    assert checkpoints.checkpoint_problem(output / 'checkpoint-2') != ''
    assert checkpoints.find_resume_checkpoint(output) == str(output / 'checkpoint-1')

    assert run_train(tiny_opt_checkpoint, dataset, output, 'qformer', *common, '--resume') == 0
    assert [step for step, _ in checkpoints.list_checkpoints(output)] == [3]
    assert checkpoints.checkpoint_problem(output / 'checkpoint-3') == ''


# Put on PYTHONPATH of one training process only: its write of SLOW_CHECKPOINT/optimizer.pt
# leaves a few bytes, says so in SLOW_CHECKPOINT_FLAG, and hangs, so the test can kill it there.
SLOW_CHECKPOINT_WRITE = """
import os
import time

import torch

_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    wanted = os.path.join(os.environ['SLOW_CHECKPOINT'], 'optimizer.pt')
    if isinstance(f, (str, os.PathLike)) and os.path.abspath(f) == wanted:
        with open(f, 'wb') as stream:
            stream.write(b'cut off')
        open(os.environ['SLOW_CHECKPOINT_FLAG'], 'w').close()
        time.sleep(600)
    return _save(obj, f, *args, **kwargs)


torch.save = slow_save
"""


def test_kill_9_while_a_checkpoint_is_written_then_resume_equals_an_uninterrupted_run(
        tmp_path, dataset, tiny_opt_checkpoint):
    """SIGKILL half-way through checkpoint-4: --resume goes on from checkpoint-2, same result."""
    common = ['--method', 'full', '--max_steps', '6', '--save_steps', '2',
              '--learning_rate', '1e-3', '--seed', '7']
    straight = tmp_path / 'straight'
    assert train.main(['--model', str(tiny_opt_checkpoint), '--data', str(dataset),
                       '--output_dir', str(straight), *FAST, *common]) == 0

    hooks = tmp_path / 'hooks'
    hooks.mkdir()
    (hooks / 'sitecustomize.py').write_text(SLOW_CHECKPOINT_WRITE)
    output = tmp_path / 'killed'
    flag = tmp_path / 'writing-checkpoint-4'
    environment = dict(_subprocess_environment(), PYTHONPATH=f'{hooks}{os.pathsep}{REPO}',
                       SLOW_CHECKPOINT=str(output / 'checkpoint-4'),
                       SLOW_CHECKPOINT_FLAG=str(flag))
    command = [sys.executable, '-m', 'training.train', '--model', str(tiny_opt_checkpoint),
               '--data', str(dataset), '--output_dir', str(output), *FAST, *common]
    with open(tmp_path / 'stderr.txt', 'w') as stderr_file:
        process = subprocess.Popen(command, cwd=REPO, env=environment,
                                   stdout=subprocess.DEVNULL, stderr=stderr_file)
        try:
            deadline = time.monotonic() + 180
            while not flag.exists() and process.poll() is None:
                assert time.monotonic() < deadline, 'checkpoint-4 was never written'
                time.sleep(0.2)
            assert process.poll() is None, (tmp_path / 'stderr.txt').read_text()[-3000:]
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == -signal.SIGKILL
    assert checkpoints.checkpoint_problem(output / 'checkpoint-2') == ''
    assert (output / 'checkpoint-4' / 'optimizer.pt').read_bytes() == b'cut off'
    assert checkpoints.CHECKPOINT_MARKER in checkpoints.checkpoint_problem(output / 'checkpoint-4')
    assert not (output / 'model.safetensors').exists()

    assert train.main(['--model', str(tiny_opt_checkpoint), '--data', str(dataset),
                       '--output_dir', str(output), *FAST, *common, '--resume']) == 0
    expected, actual = load_weights(straight), load_weights(output)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=1e-5, atol=1e-7), name

    def step_losses(folder):
        history = json.loads((folder / 'trainer_state.json').read_text())['log_history']
        return {entry['step']: entry['loss'] for entry in history if 'loss' in entry}

    losses = step_losses(straight)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert step_losses(output) == pytest.approx(losses, rel=1e-5)
    assert checkpoints.checkpoint_problem(output / 'checkpoint-4') == ''


@pytest.mark.skipif(torch.cuda.is_available(), reason='what a machine without a GPU is told')
def test_half_precision_on_a_cpu_is_refused_or_named_in_one_line(
        tmp_path, tiny_opt_checkpoint, caplog):
    """--fp16 cannot run on a CPU; --bf16 can, but is usually slower there, and says so."""
    def parse(*options):
        return train.parse_arguments([
            '--model', str(tiny_opt_checkpoint), '--data', str(tmp_path), '--output_dir',
            str(tmp_path / 'out'), '--method', 'qformer', *options])

    with pytest.raises(train.TrainingError) as error:
        parse('--fp16', 'true')
    assert '--fp16 needs a CUDA GPU' in str(error.value) and '\n' not in str(error.value)
    _, _, training_args = parse('--bf16', 'true')
    assert training_args.bf16 and training_args.use_cpu
    (warning,) = [record for record in caplog.records if '--bf16 on a CPU' in record.message]
    assert warning.levelname == 'WARNING'
    caplog.clear()
    parse()
    assert '--bf16 on a CPU' not in caplog.text


def test_setting_up_lora_prints_no_library_deprecation_warning(
        tmp_path, dataset, tiny_opt_checkpoint, recwarn):
    """A deprecated transformers property that peft reads is not the user's to fix."""
    model_args, _, training_args = train.parse_arguments([
        '--model', str(tiny_opt_checkpoint), '--data', str(dataset), '--output_dir',
        str(tmp_path / 'unused'), '--method', 'lora', '--use_cpu', 'true'])
    model, _ = train.load_model(model_args, training_args)
    recwarn.clear()
    model = train.apply_method(model, model_args)
    assert any('lora_' in name for name, _ in model.named_parameters())
    assert not [warning for warning in recwarn if 'is_gradient_checkpointing' in
                str(warning.message)], [str(warning.message) for warning in recwarn]


def test_importing_the_training_tools_prints_nothing():
    """The Trainer's import of torchao, whose CUDA-only extensions warn on a CPU, is silent."""
    result = subprocess.run([sys.executable, '-c', 'import training.train'],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == '' and result.stdout == ''
