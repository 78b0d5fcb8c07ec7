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

"""The fine-tuning demo: a second line the demo model cannot caption, taught without forgetting."""

import json
import os

from blip2_ros.demo import run as demo
import pytest
from training import finetune_demo, record_synthetic_bag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, 'models', 'factory-tiny')
# The shortened recipe: the measured one (docs/training.md) with less footage and fewer steps.
SHORT_RECIPE = finetune_demo.FinetuneRecipe(
    new_frames=500, old_frames=500, held_out_frames=100, max_steps=800, warmup_steps=80,
    metrics='exact_match', tokenizer='simple')


def test_line2_is_new_to_the_demo_model_and_line1_is_unchanged():
    """Line2 scenes use colour words no line1 caption has; line1 is synthetic_factory's own."""
    from blip2_ros.demo.synthetic_factory import DEFAULT_SPEC, scene_at

    line1 = record_synthetic_bag.site_scene_at('line1', 3, 7, (120, 160))
    assert line1.caption == scene_at(3, 7, (120, 160)).caption
    assert (line1.image == scene_at(3, 7, (120, 160)).image).all()
    words = {word for index in range(40)
             for word in record_synthetic_bag.site_scene_at('line2', 3, index).caption.split()}
    assert {'white', 'black', 'belt'} <= words
    assert not words & {'red', 'green', 'blue', 'yellow', 'conveyor'}
    assert 'white' not in DEFAULT_SPEC.vocabulary() and 'belt' not in DEFAULT_SPEC.vocabulary()
    with pytest.raises(ValueError, match='at site line2'):
        record_synthetic_bag.site_scene_at('line2', 0, 0, colours=('red',))


def test_short_recipe_teaches_line2_and_keeps_line1(tmp_path):
    """Record, convert, fine-tune, evaluate: better on line2 than the base, line1 kept."""
    results = finetune_demo.run(tmp_path / 'work', SHORT_RECIPE, DEMO_MODEL)

    line2, line1 = results['lines']['line2'], results['lines']['line1']
    # The demo model never says a line2 caption; fine-tuned briefly, it says most of them (the
    # full recipe reaches 98%, docs/training.md).
    assert line2['base']['exact_match'] <= 0.1
    assert line2['fine_tuned']['exact_match'] >= 0.6
    # Line1 frames mixed into training keep what the demo model knew (91% vs 93% here).
    assert line1['base']['exact_match'] >= 0.85
    assert line1['fine_tuned']['exact_match'] >= 0.85
    saved = json.loads((tmp_path / 'work' / finetune_demo.RESULTS_FILE).read_text())
    assert saved['lines'] == results['lines']
    table = finetune_demo.side_by_side(results)
    assert f"{line2['fine_tuned']['exact_match']:.1%}" in table and 'line1' in table


def test_demo_fine_tune_refuses_what_it_does_not_use(capsys):
    """--fine-tune fine-tunes the bundled model: another model or live captioning is an error."""
    for extra in (['--model', DEMO_MODEL], ['--from-scratch'], ['--vllm']):
        with pytest.raises(SystemExit):
            demo.parse_args(['--fine-tune', *extra])
        assert '--fine-tune fine-tunes the bundled demo model' in capsys.readouterr().err
    assert 'about' in finetune_demo.expected_minutes(finetune_demo.FinetuneRecipe())
    with pytest.raises(finetune_demo.FinetuneDemoError, match='at least 1'):
        finetune_demo.with_steps(finetune_demo.FinetuneRecipe(), 0)
