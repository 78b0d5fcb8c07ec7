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
Teach the demo model a second production line, and show what fine-tuning changed.

    python -m training.finetune_demo [--work-dir work/line2] [--max-steps N]

The demo model (models/factory-tiny) knows one line: red, green, blue and yellow items "on the
conveyor". Line2 (``record_synthetic_bag --site line2``) has white and black items "on the
belt", words it was never trained to say, so it gets no line2 caption right. The recipe runs
the steps a user runs on their own footage, each one a logged command:

1. record line2 training footage, some line1 footage (trained on too, so the model keeps
   line1), and held-out recordings of both lines from scene streams training never sees;
2. convert the two training bags into one COCO dataset, each held-out bag into its own;
3. fine-tune the demo model (``training.train --method full``: at 0.8 M parameters, training
   everything is cheap and learns the new words fastest);
4. score the base and the fine-tuned model on both held-out recordings
   (``training.evaluate --compare-base``) and print them side by side.

Everything goes into ``--work-dir``; a second run replaces what the first one wrote there,
and a folder holding anything else is refused.
"""

import argparse
from dataclasses import asdict, dataclass, fields, replace
import json
import logging
import os
import sys
import time

from training.demo_model import _run_child, _run_cli, DemoModelError, prepare_work_dir

LOGGER = logging.getLogger('training.finetune_demo')

IMAGE_TOPIC = '/camera/image_raw'
CAPTION_TOPIC = '/factory/true_caption'
DEFAULT_WORK_DIR = os.path.join('work', 'line2')
WORK_MARKER = '.finetune_demo_work'
WORK_PARTS = ('bags', 'data', 'model', 'eval')
RESULTS_FILE = 'results.json'
# The held-out recordings: (line, what the table calls it).
HELD_OUT = (('line2', 'line2 (new: white and black items, "on the belt")'),
            ('line1', "line1 (old: the demo model's conveyor)"))


class FinetuneDemoError(RuntimeError):
    """A step failed or cannot start; the message is one line."""


@dataclass(frozen=True)
class FinetuneRecipe:
    """Everything that decides the fine-tuning demo; the defaults are the measured recipe."""

    new_frames: int = 1500
    old_frames: int = 1000
    held_out_frames: int = 200
    width: int = 160
    height: int = 120
    method: str = 'full'
    max_steps: int = 3000
    learning_rate: float = 5e-4
    warmup_steps: int = 300
    batch_size: int = 32
    # Scene streams: the demo model was trained on 0 and checked on 1.
    new_seed: int = 10
    old_seed: int = 11
    new_held_out_seed: int = 12
    old_held_out_seed: int = 13
    metrics: str = 'Bleu,ROUGE_L,CIDEr,exact_match'
    tokenizer: str = 'auto'

    def __post_init__(self):
        """Reject values the recipe cannot use, with the fix."""
        if min(self.new_frames, self.held_out_frames, self.max_steps, self.batch_size) < 1:
            raise FinetuneDemoError('--new-frames, --held-out-frames, --max-steps and '
                                    '--batch-size must be at least 1')
        if min(self.old_frames, self.warmup_steps) < 0:
            raise FinetuneDemoError('--old-frames and --warmup-steps must not be negative')
        seeds = (self.new_seed, self.old_seed, self.new_held_out_seed, self.old_held_out_seed)
        if len(set(seeds + (0, 1))) != 6:
            raise FinetuneDemoError('the four scene-stream seeds must differ from each other '
                                    "and from the demo model's 0 and 1")


# Seconds the default recipe took on 2 busy CPU cores (docs/training.md): fine-tuning, and the
# rest (recording, converting, scoring 4 x 200 held-out frames), to say how long a run takes.
MEASURED_TRAIN_SECONDS = 293.0
MEASURED_OTHER_SECONDS = 17.0


def with_steps(recipe, max_steps):
    """Return ``recipe`` with ``max_steps``, its warm-up the same share of the run."""
    if max_steps < 1:
        raise FinetuneDemoError(f'--train-steps must be at least 1, not {max_steps}')
    default = FinetuneRecipe()
    return replace(recipe, max_steps=max_steps,
                   warmup_steps=max_steps * default.warmup_steps // default.max_steps)


def expected_minutes(recipe):
    """Say how long ``recipe`` takes, scaled from the default recipe's measured time."""
    default = FinetuneRecipe()
    seconds = (MEASURED_TRAIN_SECONDS * recipe.max_steps * recipe.batch_size
               / (default.max_steps * default.batch_size) + MEASURED_OTHER_SECONDS)
    return f'about {max(1, round(seconds / 60))} min'


def demo_model_path():
    """Return the bundled demo model's folder (installed share/ or the source checkout)."""
    from blip2_ros.demo.run import demo_model_path as bundled

    return bundled()


def _scores(eval_dir):
    """Return ``(base, fine-tuned)`` scores from a training.evaluate --compare-base run."""
    with open(os.path.join(eval_dir, 'metrics.json'), encoding='utf-8') as stream:
        models = json.load(stream)['models']
    return models['base']['scores'], models['model']['scores']


def run(work_dir, recipe=None, base_model=''):
    """Run the recipe in ``work_dir``; return the results dict (also in results.json)."""
    from training import bag_to_coco, record_synthetic_bag

    recipe = recipe or FinetuneRecipe()
    base_model = base_model or demo_model_path()
    if not os.path.isfile(os.path.join(base_model, 'config.json')):
        raise FinetuneDemoError(f'the demo model is missing from {base_model}: give --model')
    work_dir = os.path.abspath(work_dir)
    prepare_work_dir(work_dir, WORK_PARTS, WORK_MARKER, 'training.finetune_demo')
    path = {name: os.path.join(work_dir, *name.split('/')) for name in (
        'bags/line2_train', 'bags/line1_train', 'bags/line2_held_out', 'bags/line1_held_out',
        'data/train', 'data/line2_held_out', 'data/line1_held_out', 'model', 'eval/line2',
        'eval/line1')}
    seconds = {}
    started = time.monotonic()

    def stage_done(name):
        seconds[name] = round(time.monotonic() - started - sum(seconds.values()), 1)
        LOGGER.info('%s done after %.0f s', name, time.monotonic() - started)

    # 1. Record, as `ros2 bag record` would: the training footage of both lines (line1 a share,
    #    so the model keeps it), then held-out footage of scene streams training never sees.
    size = f'{recipe.width}x{recipe.height}'
    recordings = [('bags/line2_train', 'line2', recipe.new_frames, recipe.new_seed),
                  ('bags/line1_train', 'line1', recipe.old_frames, recipe.old_seed),
                  ('bags/line2_held_out', 'line2', recipe.held_out_frames,
                   recipe.new_held_out_seed),
                  ('bags/line1_held_out', 'line1', recipe.held_out_frames,
                   recipe.old_held_out_seed)]
    for bag, line, frames, seed in recordings:
        if frames:
            _run_cli('record_synthetic_bag', record_synthetic_bag.main, [
                '--out', path[bag], '--site', line, '--frames', frames, '--seed', seed,
                '--size', size])
    stage_done('record')

    # 2. Bags -> COCO captions: both training bags into one dataset, each held-out bag alone.
    training_bags = [path['bags/line2_train']] + (
        [path['bags/line1_train']] if recipe.old_frames else [])
    for bags, dataset in ((training_bags, 'data/train'),
                          ([path['bags/line2_held_out']], 'data/line2_held_out'),
                          ([path['bags/line1_held_out']], 'data/line1_held_out')):
        _run_cli('bag_to_coco', bag_to_coco.main, [
            *bags, '--image-topic', IMAGE_TOPIC, '--caption-topic', CAPTION_TOPIC,
            '--image-format', 'png', '--out', path[dataset], '--quiet'])
    stage_done('convert')

    # 3. Fine-tune on every training frame: the held-out recordings are the validation.
    _run_child('train', [
        '--model', base_model, '--data', path['data/train'], '--train_split', 'all',
        '--eval_split', '', '--output_dir', path['model'], '--method', recipe.method,
        '--max_steps', recipe.max_steps, '--learning_rate', recipe.learning_rate,
        '--warmup_steps', recipe.warmup_steps,
        '--per_device_train_batch_size', recipe.batch_size, '--seed', 0,
        '--cache_images', 'true', '--save_strategy', 'no', '--report_to', 'none',
        '--logging_steps', 100, '--dataloader_pin_memory', 'false', '--cpu_threads', 1])
    stage_done('train')

    # 4. Base and fine-tuned model on both held-out recordings.
    adapter = ['--model', base_model, '--adapter', path['model']] if recipe.method == 'lora' \
        else ['--model', path['model']]
    for line, _ in HELD_OUT:
        _run_child('evaluate', [
            *adapter, '--compare-base', '--data', path[f'data/{line}_held_out'], '--split', 'all',
            '--out', path[f'eval/{line}'], '--metrics', recipe.metrics,
            '--tokenizer', recipe.tokenizer])
    stage_done('evaluate')

    results = {'recipe': asdict(recipe), 'base_model': base_model, 'stage_seconds': seconds,
               'wall_seconds': round(time.monotonic() - started, 1), 'lines': {}}
    for line, _ in HELD_OUT:
        base, tuned = _scores(path[f'eval/{line}'])
        results['lines'][line] = {'base': base, 'fine_tuned': tuned}
    with open(os.path.join(work_dir, RESULTS_FILE), 'w', encoding='utf-8') as stream:
        json.dump(results, stream, indent=1, sort_keys=True)
        stream.write('\n')
    return results


def side_by_side(results):
    """Return the base vs fine-tuned table of exact match on both lines' held-out frames."""
    frames = results['recipe']['held_out_frames']
    title = f'exact match, {frames} held-out frames per line'
    width = max(len(title), *(len(name) for _, name in HELD_OUT)) + 2
    lines = [title.ljust(width) + 'base'.rjust(8) + 'fine-tuned'.rjust(12)]
    for line, name in HELD_OUT:
        scores = results['lines'][line]
        lines.append(name.ljust(width) + f"{scores['base']['exact_match']:.1%}".rjust(8)
                     + f"{scores['fine_tuned']['exact_match']:.1%}".rjust(12))
    lines.append(f"recording to evaluation in {results['wall_seconds']:.0f} s ("
                 + ', '.join(f'{name} {value:.0f} s'
                             for name, value in results['stage_seconds'].items()) + ')')
    return '\n'.join(lines)


def parse_args(argv=None):
    """Parse the command line: the work folder, the base model and the recipe's settings."""
    default = FinetuneRecipe()
    parser = argparse.ArgumentParser(
        prog='python -m training.finetune_demo', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--work-dir', default=DEFAULT_WORK_DIR,
                        help=f'folder for bags, datasets, model and scores (default '
                        f'{DEFAULT_WORK_DIR}; an earlier run there is replaced)')
    parser.add_argument('--model', default='',
                        help='model to fine-tune (default: the bundled demo model)')
    for item in fields(FinetuneRecipe):
        value = getattr(default, item.name)
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(value),
                            default=value, help=f'(default {value})')
    return parser.parse_args(argv)


def main(argv=None):
    """Command line: run the recipe and print the table; return the exit status."""
    logging.basicConfig(format='%(asctime)s %(name)s: %(message)s', level=logging.INFO)
    args = parse_args(argv)
    try:
        recipe = FinetuneRecipe(**{item.name: getattr(args, item.name)
                                   for item in fields(FinetuneRecipe)})
        results = run(args.work_dir, recipe, args.model)
    except (FinetuneDemoError, DemoModelError) as error:
        print(f'finetune_demo: error: {error}', file=sys.stderr)
        return 1
    print(side_by_side(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
