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
Reproduce the demo model: a tiny BLIP-2 trained from scratch on synthetic factory footage.

    python -m training.demo_model --out models/factory-tiny [--work-dir DIR]

The whole loop a user runs on their own footage, with the project's own tools:

1. record a rosbag2 bag of the factory camera (``training.record_synthetic_bag``), frames at
   the size the live demo camera publishes, with the operator's true captions on a topic, and
   a second, fresh recording of a scene stream the training never sees;
2. convert both to COCO captions datasets (``training.bag_to_coco``), PNG so training sees
   the same pixels as the raw live frames;
3. split the first by blocks of recording time (``training.split``);
4. build a BLIP-2 from scratch (``training.tiny_blip2``) and train all of it
   (``training.train --method full``);
5. score it with ``training.evaluate`` (the metrics table, exact match included) on the
   validation split and on the fresh recording;
6. copy model, processor, ``demo_recipe.json`` and a README into ``--out``.

Scenes have 48 possible captions (count x colour x kind), so guessing scores 1/48 = 2.1%.
Training and evaluation run as child processes with ``OMP_WAIT_POLICY=PASSIVE`` (unless set):
on a small machine shared with other work, OpenMP threads that spin while they wait made each
training step many times slower.
"""

import argparse
from dataclasses import asdict, dataclass, fields
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from blip2_ros.demo.synthetic_factory import DEFAULT_SPEC
from training.coco import usual_mode

LOGGER = logging.getLogger('training.demo_model')

RECIPE_FILE = 'demo_recipe.json'
README_FILE = 'README.md'
DEFAULT_OUT = os.path.join('models', 'factory-tiny')
# Written by training.train beside the weights (blip2_ros.captioner reads it; imports torch).
TRAINING_INFO_FILE = 'blip2_ros_training.json'
# What a model folder needs at inference; the Trainer's other files (optimizer state, pickled
# training arguments, logs) stay in the work folder.
MODEL_FILES = ('config.json', 'generation_config.json', 'model.safetensors',
               'processor_config.json', 'preprocessor_config.json', 'tokenizer.json',
               'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja',
               TRAINING_INFO_FILE)
REQUIRED_MODEL_FILES = ('config.json', 'model.safetensors', 'tokenizer.json')
# training.train records the folder it started from as the base model: here a work folder,
# often a temporary one, so the model folder names what that folder held instead.
BASE_MODEL = 'tiny BLIP-2 built from scratch by training.demo_model'
# Sub-folders reproduce() writes in the work folder; a marker file says the folder is ours.
WORK_PARTS = ('bag', 'fresh_bag', 'dataset', 'fresh_dataset', 'init_model', 'train', 'eval',
              'fresh_eval', 'model')
WORK_MARKER = '.demo_model_work'
IMAGE_TOPIC = '/camera/image_raw'
CAPTION_TOPIC = '/factory/true_caption'
# The folder that holds the training and blip2_ros packages, for the child processes.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DemoModelError(RuntimeError):
    """A step of the reproduction failed or cannot start; the message is one line."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model; the committed model used these defaults."""

    frames: int = 3000
    width: int = 160
    height: int = 120
    seed: int = 0
    rate_hz: float = 10.0
    val_fraction: float = 0.1
    block_seconds: float = 10.0
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 96
    # Language model heads apart from the others: 3 at hidden 96 make heads of 32 values, a size
    # vLLM's CPU attention serves (it refuses 24, what 4 heads would make).
    text_num_heads: int = 3
    max_steps: int = 3000
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    batch_size: int = 32
    max_grad_norm: float = 1.0
    fresh_seed: int = 1
    fresh_frames: int = 300

    def __post_init__(self):
        """Reject values the loop cannot use, with the fix."""
        if self.frames < 100:
            raise DemoModelError(f'--frames {self.frames} is too few: use at least 100')
        if min(self.width, self.height) < 16:
            raise DemoModelError(f'frame size {self.width}x{self.height} is too small: '
                                 'both sides need 16 px or more')
        if self.image_size % self.patch_size:
            raise DemoModelError(f'--image-size {self.image_size} must be a multiple of '
                                 f'--patch-size {self.patch_size}')
        if self.fresh_seed == self.seed:
            raise DemoModelError(f'--fresh-seed must differ from --seed ({self.seed}): fresh '
                                 'frames must come from a scene stream training never saw')
        if min(self.max_steps, self.fresh_frames, self.batch_size, self.text_num_heads) < 1 or min(
                self.seed, self.fresh_seed, self.warmup_steps) < 0:
            raise DemoModelError('--max-steps, --fresh-frames, --batch-size and --text-num-heads '
                                 'must be positive; seeds and --warmup-steps not negative')
        if self.hidden_size % self.text_num_heads:
            raise DemoModelError(f'--hidden-size {self.hidden_size} must be a multiple of '
                                 f'--text-num-heads {self.text_num_heads}')

    @property
    def size(self):
        """Return the frame size as (height, width), as synthetic_factory takes it."""
        return self.height, self.width


def _run_cli(name, main, argv):
    """Run a light training CLI's ``main(argv)`` here; raise DemoModelError if it fails."""
    LOGGER.info('$ python -m training.%s %s', name, ' '.join(str(arg) for arg in argv))
    status = main([str(arg) for arg in argv])
    if status:
        raise DemoModelError(f'training.{name} failed with exit status {status}; its message '
                             'is above')


def _run_child(name, argv):
    """Run ``python -m training.<name> argv`` as a child process; DemoModelError if it fails."""
    argv = [str(arg) for arg in argv]
    LOGGER.info('$ python -m training.%s %s', name, ' '.join(argv))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [PACKAGE_PARENT] + [path for path in env.get('PYTHONPATH', '').split(os.pathsep)
                            if path])
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    status = subprocess.run([sys.executable, '-m', f'training.{name}', *argv], env=env).returncode
    if status:
        raise DemoModelError(f'training.{name} failed with exit status {status}; its message '
                             'is above')


def prepare_work_dir(work_dir, parts=WORK_PARTS, marker=WORK_MARKER,
                     writer='training.demo_model'):
    """Create ``work_dir``, or clear what ``writer`` left there before; refuse other folders."""
    if os.path.isdir(work_dir) and os.listdir(work_dir):
        if not os.path.isfile(os.path.join(work_dir, marker)):
            raise DemoModelError(f"work folder '{work_dir}' holds other files: choose an "
                                 'empty or new --work-dir')
        for part in parts:
            shutil.rmtree(os.path.join(work_dir, part), ignore_errors=True)
    os.makedirs(work_dir, exist_ok=True)
    with open(os.path.join(work_dir, marker), 'w', encoding='utf-8') as stream:
        stream.write(f'written by python -m {writer}; its sub-folders are replaced on the next '
                     'run\n')


def _scores(eval_dir):
    with open(os.path.join(eval_dir, 'metrics.json'), encoding='utf-8') as stream:
        model = json.load(stream)['models']['model']
    return model['scores'], model['images']


def _copy_model(source, destination):
    os.makedirs(destination, exist_ok=True)
    for name in MODEL_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(destination, name))
    missing = [name for name in REQUIRED_MODEL_FILES
               if not os.path.isfile(os.path.join(destination, name))]
    if missing:
        raise DemoModelError(f'training left no {", ".join(missing)} in {source}')


def _readme(recipe, results, command):
    spec = DEFAULT_SPEC
    rows = [
        (f"validation split: {results['val_images']} frames of the recording",
         results['val_exact_match']),
        (f"fresh frames: {results['fresh_frames']} of scene stream {recipe.fresh_seed}, "
         'never seen in training', results['fresh_exact_match']),
    ]
    return '\n'.join([
        '# factory-tiny: the demo model of blip2_ros',
        '',
        f"A BLIP-2 of {results['parameters'] / 1e6:.2f} M parameters (vision encoder, Q-Former "
        "and OPT decoder), trained from random weights on a CPU by this project's own tools, "
        'on footage of the synthetic factory (`blip2_ros.demo.synthetic_factory`). It captions '
        f'{recipe.width}x{recipe.height} frames of that factory as "<count> <colour> <kind> on '
        f'the conveyor": {spec.num_captions} possible captions, so chance level is '
        f'1/{spec.num_captions} = {spec.chance_level:.1%}. It knows nothing else.',
        '',
        '| held-out frames | exact match |',
        '|---|---|',
        *(f'| {title} | {value:.1%} |' for title, value in rows),
        '',
        f"Reproduce it ({results['wall_seconds']:.0f} s on the machine that built it, "
        f'{os.cpu_count()} CPU cores):',
        '',
        f'    {command}',
        '',
        f'That records a rosbag2 bag of {recipe.frames} frames (scene stream {recipe.seed}), '
        'converts it with `training.bag_to_coco`, splits it with `training.split`, builds the '
        'model with `training.tiny_blip2`, trains it with `training.train --method full` '
        f'({recipe.max_steps} steps, batch {recipe.batch_size}, learning rate '
        f'{recipe.learning_rate:g}, {recipe.warmup_steps} warm-up steps), scores it with '
        '`training.evaluate` on the validation split and on a fresh recording, and writes this '
        'folder. '
        f'`{RECIPE_FILE}` holds every setting and result; the demo camera publishes frames of '
        'its `size`.',
        ''])


def reproduce(work_dir, frames=None, seed=None, out=None, recipe=None, command=None):
    """
    Run the whole loop in ``work_dir`` and return the folder of the finished model.

    ``recipe`` (a DemoRecipe, default: the committed model's) sets everything; ``frames`` and
    ``seed`` override its recording. The model goes to ``out`` (replaced if it holds an
    earlier demo model), or to ``work_dir``/model. Raises DemoModelError (one line).
    """
    from training import bag_to_coco, split
    from training.record_synthetic_bag import record_synthetic_bag, RecordError
    from training.tiny_blip2 import build_tiny_blip2

    recipe = recipe or DemoRecipe()
    overrides = {}
    if frames:
        overrides['frames'] = int(frames)
    if seed is not None and seed != recipe.seed:
        overrides['seed'] = int(seed)
        if seed == recipe.fresh_seed:
            overrides['fresh_seed'] = max(recipe.fresh_seed, recipe.seed) + 1
    if overrides:
        recipe = DemoRecipe(**{**asdict(recipe), **overrides})
    work_dir = os.path.abspath(work_dir)
    out = os.path.abspath(out) if out else os.path.join(work_dir, 'model')
    if out != os.path.join(work_dir, 'model'):
        _check_out(out)
    prepare_work_dir(work_dir)
    paths = {part: os.path.join(work_dir, part) for part in WORK_PARTS}
    seconds = {}
    started = time.monotonic()

    def stage_done(name):
        seconds[name] = round(time.monotonic() - started - sum(seconds.values()), 1)
        LOGGER.info('%s done after %.0f s', name, time.monotonic() - started)

    # 1. Record the factory camera into bags, as `ros2 bag record` would: the training
    #    footage, and fresh footage of a scene stream that training never sees.
    for bag, frames_wanted, scene_seed in ((paths['bag'], recipe.frames, recipe.seed),
                                           (paths['fresh_bag'], recipe.fresh_frames,
                                            recipe.fresh_seed)):
        LOGGER.info('recording %d frames of %dx%d (scene stream %d) into %s', frames_wanted,
                    recipe.width, recipe.height, scene_seed, bag)
        try:
            record_synthetic_bag(bag, frames_wanted, rate_hz=recipe.rate_hz, size=recipe.size,
                                 seed=scene_seed)
        except RecordError as error:
            raise DemoModelError(f'recording failed: {error}') from error
    stage_done('record')

    # 2. Bags -> COCO captions, the operator's caption topic as the captions.
    for bag, dataset in ((paths['bag'], paths['dataset']),
                         (paths['fresh_bag'], paths['fresh_dataset'])):
        _run_cli('bag_to_coco', bag_to_coco.main, [
            bag, '--image-topic', IMAGE_TOPIC, '--caption-topic', CAPTION_TOPIC,
            '--image-format', 'png', '--out', dataset, '--quiet'])
    stage_done('convert')

    # 3. Train/val split by blocks of recording time.
    _run_cli('split', split.main, [
        paths['dataset'], '--val-fraction', recipe.val_fraction, '--seed', recipe.seed,
        '--block-seconds', recipe.block_seconds, '--no-decode'])
    stage_done('split')

    # 4. A BLIP-2 from scratch with the captions' words, trained whole.
    build_tiny_blip2(paths['init_model'], language_model='opt', seed=recipe.seed,
                     words=DEFAULT_SPEC.vocabulary(), image_size=recipe.image_size,
                     patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
                     text_num_heads=recipe.text_num_heads)
    _run_child('train', [
        '--model', paths['init_model'], '--data', paths['dataset'],
        '--output_dir', paths['train'], '--method', 'full', '--max_steps', recipe.max_steps,
        '--learning_rate', recipe.learning_rate, '--warmup_steps', recipe.warmup_steps,
        '--max_grad_norm', recipe.max_grad_norm,
        '--per_device_train_batch_size', recipe.batch_size, '--seed', recipe.seed,
        '--cache_images', 'true', '--eval_strategy', 'no', '--save_strategy', 'no',
        '--logging_steps', 50, '--dataloader_pin_memory', 'false'])
    stage_done('train')

    # 5. The metrics tables: the validation split, then the fresh recording.
    _run_child('evaluate', ['--model', paths['train'], '--data', paths['dataset'],
                            '--split', 'val', '--out', paths['eval']])
    _run_child('evaluate', ['--model', paths['train'], '--data', paths['fresh_dataset'],
                            '--split', 'all', '--out', paths['fresh_eval']])
    val_scores, val_images = _scores(paths['eval'])
    fresh_scores, fresh_images = _scores(paths['fresh_eval'])
    stage_done('evaluate')

    # 6. The model folder: weights, processor, recipe and README.
    results = {
        'val_exact_match': val_scores['exact_match'], 'val_images': val_images,
        'val_metrics': val_scores, 'fresh_exact_match': fresh_scores['exact_match'],
        'fresh_frames': fresh_images, 'fresh_seed': recipe.fresh_seed,
        'fresh_metrics': fresh_scores, 'chance_level': DEFAULT_SPEC.chance_level,
        'possible_captions': DEFAULT_SPEC.num_captions,
        'parameters': _count_parameters(paths['train']),
        'wall_seconds': round(time.monotonic() - started, 1), 'stage_seconds': seconds}
    command = command or _command(out, recipe)
    _write_model_folder(paths['train'], out, recipe, results, command)
    LOGGER.info('exact match %.1f%% on %d validation frames, %.1f%% on %d fresh frames '
                '(chance %.1f%%); %s written after %.0f s', 100 * results['val_exact_match'],
                val_images, 100 * results['fresh_exact_match'], fresh_images,
                100 * DEFAULT_SPEC.chance_level, out, results['wall_seconds'])
    return out


def _count_parameters(model_folder):
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(model_folder, 'model.safetensors'), 'pt') as weights:
        for name in weights.keys():
            count = 1
            for side in weights.get_slice(name).get_shape():
                count *= side
            total += count
    return total


def _check_out(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoModelError(f"--out '{out}' is a file: name a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(
            os.path.join(out, RECIPE_FILE)):
        raise DemoModelError(f"--out '{out}' holds files that are not a demo model: choose a "
                             'new or empty folder')


def _command(out, recipe):
    words = ['python -m training.demo_model --out', os.path.relpath(out)
             if not os.path.relpath(out).startswith('..') else out]
    default = DemoRecipe()
    for item in fields(DemoRecipe):
        value = getattr(recipe, item.name)
        if value != getattr(default, item.name):
            words += [f"--{item.name.replace('_', '-')}", str(value)]
    return ' '.join(words)


def _write_model_folder(trained, out, recipe, results, command):
    """Assemble the model folder next to ``out``, then swap it in."""
    parent = os.path.dirname(out) or '.'
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.demo_model_', dir=parent)
    try:
        _copy_model(trained, staging)
        _name_base_model(staging)
        _make_readable(staging)
        recipe_data = {'size': [recipe.width, recipe.height], 'command': command,
                       'recipe': asdict(recipe), 'results': results}
        with open(os.path.join(staging, RECIPE_FILE), 'w', encoding='utf-8') as stream:
            json.dump(recipe_data, stream, indent=1, sort_keys=True)
            stream.write('\n')
        with open(os.path.join(staging, README_FILE), 'w', encoding='utf-8') as stream:
            stream.write(_readme(recipe, results, command))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _name_base_model(folder):
    """Record in the training info what the model started from, not the work folder's path."""
    path = os.path.join(folder, TRAINING_INFO_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8') as stream:
        info = json.load(stream)
    info['base_model'] = BASE_MODEL
    with open(path, 'w', encoding='utf-8') as stream:
        json.dump(info, stream, indent=1, sort_keys=True)
        stream.write('\n')


def _make_readable(folder):
    """Give the folder and its files the usual permissions (temporary files start private)."""
    os.chmod(folder, usual_mode(folder=True))
    mode = usual_mode()
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), mode)


def parse_args(argv=None):
    """Parse the command line."""
    default = DemoRecipe()
    parser = argparse.ArgumentParser(
        prog='python -m training.demo_model', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--out', default=DEFAULT_OUT,
                        help=f'folder for the finished model (default {DEFAULT_OUT}); an '
                        'earlier demo model there is replaced')
    parser.add_argument('--work-dir', default='',
                        help='folder for the bag, dataset, checkpoints and metrics '
                        '(default: a temporary folder, removed at the end)')
    for item in fields(DemoRecipe):
        value = getattr(default, item.name)
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(value),
                            default=value, help=f'(default {value})')
    return parser.parse_args(argv)


def main(argv=None):
    """Command line: reproduce the demo model; return the exit status."""
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                        level=logging.INFO)
    args = parse_args(argv)
    temporary = ''
    try:
        recipe = DemoRecipe(**{item.name: getattr(args, item.name)
                               for item in fields(DemoRecipe)})
        work_dir = args.work_dir
        if not work_dir:
            temporary = work_dir = tempfile.mkdtemp(prefix='demo_model_')
        out = reproduce(work_dir, out=args.out, recipe=recipe)
    except DemoModelError as error:
        print(f'demo_model: error: {error}', file=sys.stderr)
        return 1
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    with open(os.path.join(out, RECIPE_FILE), encoding='utf-8') as stream:
        results = json.load(stream)['results']
    print(f"{out}: exact match {results['val_exact_match']:.1%} on {results['val_images']} "
          f"validation frames, {results['fresh_exact_match']:.1%} on {results['fresh_frames']} "
          f"fresh frames (chance {results['chance_level']:.1%}); "
          f"{results['wall_seconds']:.0f} s")
    return 0


if __name__ == '__main__':
    sys.exit(main())
