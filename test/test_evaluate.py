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

"""training.evaluate: COCO caption scores, published numbers, fallbacks, model comparison."""

import json
import logging
import os
from pathlib import Path
import shutil
import subprocess
import sys

from blip2_ros.captioner import TRAINING_INFO_FILE
import numpy as np
from PIL import Image
import pytest
import torch
from training import evaluate

REPO = Path(__file__).resolve().parents[1]
COCO_CAPTION = Path(os.environ.get(
    'BLIP2_ROS_REALDATA', REPO.parent / 'shared' / 'realdata')) / 'coco_caption'
FAKECAP_RESULTS = COCO_CAPTION / 'captions_val2014_fakecap_results.json'
TOKENIZED_REFS = COCO_CAPTION / 'tmp0vywi_73'
# cocoEvalCapDemo.ipynb in tylin/coco-caption (see SOURCES.md), printed to 3 decimals.
PUBLISHED = {'Bleu_1': 0.579, 'Bleu_2': 0.404, 'Bleu_3': 0.279, 'Bleu_4': 0.191,
             'METEOR': 0.195, 'ROUGE_L': 0.396, 'CIDEr': 0.600}

# Hand-made: case, punctuation and a contraction, so tokenization matters.
REFERENCES = {
    1: ['Two red boxes on the conveyor.', 'A conveyor carrying two red boxes!'],
    2: ['One blue gear, on the belt.', "The robot's arm above one blue gear"],
    3: ['three yellow bottles on the conveyor', 'Three yellow bottles standing in a row.'],
}
PREDICTIONS = {1: 'two red boxes on the conveyor', 2: 'one green gear on the belt',
               3: 'Three yellow bottles on the conveyor.'}


def write_hand_made(folder):
    """Write REFERENCES as COCO annotations and PREDICTIONS as a COCO results file."""
    annotations = {'images': [{'id': key} for key in REFERENCES], 'annotations': []}
    for key, texts in REFERENCES.items():
        for text in texts:
            annotations['annotations'].append(
                {'id': len(annotations['annotations']) + 1, 'image_id': key, 'caption': text})
    results = [{'image_id': key, 'caption': text} for key, text in PREDICTIONS.items()]
    annotations_path, results_path = folder / 'annotations.json', folder / 'results.json'
    annotations_path.write_text(json.dumps(annotations))
    results_path.write_text(json.dumps(results))
    return results_path, annotations_path


def direct_scores(gts, res):
    """Score already-tokenized captions with pycocoevalcap's scorers, no project code."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f'Bleu_{order}': value for order, value in enumerate(bleu, start=1)})
    if evaluate.java_available():
        scores['METEOR'], _ = Meteor().compute_score(gts, res)
    scores['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    scores['CIDEr'], _ = Cider().compute_score(gts, res)
    return scores


def test_published_coco_scores_are_reproduced(tmp_path):
    """The fakecap results scored against the COCO references give the published numbers."""
    references = json.loads(TOKENIZED_REFS.read_text())
    annotations = {'images': [{'id': entry['image_id']} for entry in references],
                   'annotations': []}
    for entry in references:
        for text in entry['refs']:
            annotations['annotations'].append({'id': len(annotations['annotations']) + 1,
                                               'image_id': entry['image_id'],
                                               'caption': text})
    annotations_path = tmp_path / 'captions_val2014_refs.json'
    annotations_path.write_text(json.dumps(annotations))
    out = tmp_path / 'scores'

    assert evaluate.main(['--results', str(FAKECAP_RESULTS), '--annotations',
                          str(annotations_path), '--out', str(out)]) == 0

    report = json.loads((out / 'metrics.json').read_text())['models']['results']
    assert report['images'] == 1000
    assert report['tokenizer'] == 'ptb'
    for name, published in PUBLISHED.items():
        assert abs(report['scores'][name] - published) <= 0.0005, (name, report['scores'][name])
    # SPICE needs models that are downloaded at first use: reported, not fatal.
    assert 'SPICE' in report['unavailable']


def test_scores_match_pycocoevalcap_called_directly(tmp_path):
    """score_captions gives exactly what PTBTokenizer + the pycocoevalcap scorers give."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    result = evaluate.score_captions(REFERENCES, PREDICTIONS)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{'caption': text} for text in texts]
                              for key, texts in REFERENCES.items()})
    res = tokenizer.tokenize({key: [{'caption': text}] for key, text in PREDICTIONS.items()})
    expected = direct_scores(gts, res)
    assert result.tokenizer == 'ptb'
    assert set(expected) <= set(result.scores)
    for name, value in expected.items():
        assert result.scores[name] == pytest.approx(value, abs=1e-12), name
    # Images 1 and 3 equal a reference once case and punctuation are normalised; 2 does not.
    assert result.scores['exact_match'] == pytest.approx(2 / 3)


def test_exact_match_counts_a_prediction_equal_to_any_reference():
    """Every reference of an image counts, not only the first one."""
    references = {1: ['two red boxes on the conveyor', 'A conveyor with two red boxes.'],
                  2: ['one blue gear', 'a blue gear on the belt', 'One gear, blue.'],
                  3: ['a robot arm', 'an arm of a robot']}
    predictions = {1: 'a conveyor with two red boxes', 2: 'one gear blue', 3: 'a robot'}
    result = evaluate.score_captions(references, predictions, metrics=('exact_match',),
                                     tokenizer='simple')
    assert result.scores == {'exact_match': pytest.approx(2 / 3)}


@pytest.mark.skipif(not evaluate.java_available(), reason='the PTB tokenizer needs Java')
def test_a_line_break_inside_a_caption_does_not_move_captions_to_other_images():
    """PTB tokenizes line by line: a carriage return or U+2028 stays inside its caption."""
    metrics = ('Bleu', 'ROUGE_L', 'CIDEr', 'exact_match')
    expected = evaluate.score_captions(REFERENCES, PREDICTIONS, metrics=metrics).scores
    references = {**REFERENCES, 2: ['One blue gear,\u2028on the belt.', REFERENCES[2][1]]}
    predictions = {**PREDICTIONS, 1: 'two red boxes\r\non the conveyor'}

    result = evaluate.score_captions(references, predictions, metrics=metrics)

    assert result.tokenizer == 'ptb'
    for name, value in expected.items():
        assert result.scores[name] == pytest.approx(value, abs=1e-12), name
    assert result.scores['exact_match'] == pytest.approx(2 / 3)


def test_simple_tokenizer_looks_like_ptb_output():
    """The Java-free tokenizer lower-cases and drops the punctuation PTB drops."""
    assert evaluate.simple_tokenize('Two RED boxes, on the conveyor!') == \
        'two red boxes on the conveyor'
    assert evaluate.simple_tokenize("The robot's arm -- above.") == "the robot's arm above"


def test_without_java_the_simple_tokenizer_is_used_and_meteor_is_unavailable(tmp_path):
    """With no java on the PATH, BLEU/ROUGE/CIDEr are still computed and METEOR is reported."""
    results_path, annotations_path = write_hand_made(tmp_path)
    out = tmp_path / 'scores'
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable),
                       PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, '-m', 'training.evaluate', '--results', str(results_path),
         '--annotations', str(annotations_path), '--out', str(out)],
        capture_output=True, text=True, env=environment, cwd=REPO, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert 'java not found' in completed.stderr
    assert 'METEOR unavailable for results: needs Java' in completed.stdout
    report = json.loads((out / 'metrics.json').read_text())['models']['results']
    assert report['tokenizer'] == 'simple'
    assert set(report['unavailable']) == {'METEOR', 'SPICE'}
    gts = {key: [evaluate.simple_tokenize(text) for text in texts]
           for key, texts in REFERENCES.items()}
    res = {key: [evaluate.simple_tokenize(text)] for key, text in PREDICTIONS.items()}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    bleu, _ = Bleu(4).compute_score(gts, res)
    assert report['scores']['Bleu_4'] == pytest.approx(bleu[3], abs=1e-12)
    assert report['scores']['ROUGE_L'] == pytest.approx(
        Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert report['scores']['CIDEr'] == pytest.approx(
        Cider().compute_score(gts, res)[0], abs=1e-12)


def test_bad_results_file_is_one_line_error(tmp_path):
    """A result for an image the annotations do not have is refused with one line."""
    results_path, annotations_path = write_hand_made(tmp_path)
    results_path.write_text(json.dumps([{'image_id': 99, 'caption': 'a box'}]))
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--results', str(results_path), '--annotations', str(annotations_path)])
    message = str(raised.value)
    assert message.startswith('error: ') and '\n' not in message
    assert 'image 99' in message
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--results', str(results_path)])
    assert '--results and --annotations go together' in str(raised.value)


def score_files_error(results_path, annotations_path):
    """Run the files mode; return its one-line error message."""
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--results', str(results_path), '--annotations', str(annotations_path),
                       '--tokenizer', 'simple', '--metrics', 'exact_match'])
    message = str(raised.value)
    assert message.startswith('error: ') and '\n' not in message
    return message


@pytest.mark.parametrize('entry, expected', [
    ({'id': 9, 'image_id': 1}, 'annotations[6] needs image_id and caption'),
    ({'id': 9, 'caption': 'a box'}, 'annotations[6] needs image_id and caption'),
    ({'id': 9, 'image_id': [1], 'caption': 'a box'},
     'annotations[6]: image_id must be an integer (or a string), not [1]'),
    ({'id': 9, 'image_id': 1, 'caption': None},
     'annotations[6]: caption must be a string, not null'),
    # An empty prediction would equal it: exact match 1 for saying nothing.
    ({'id': 9, 'image_id': 1, 'caption': ' '}, 'annotations[6]: caption is empty'),
])
def test_a_bad_annotation_is_one_line_error(tmp_path, entry, expected):
    """An annotation without caption or image_id, or with an unusable one, names its index."""
    results_path, annotations_path = write_hand_made(tmp_path)
    annotations = json.loads(annotations_path.read_text())
    assert len(annotations['annotations']) == 6
    annotations['annotations'].append(entry)
    annotations_path.write_text(json.dumps(annotations))
    assert expected in score_files_error(results_path, annotations_path)


@pytest.mark.parametrize('entry, expected', [
    ({'image_id': [1], 'caption': 'a box'},
     'result 0: image_id must be an integer (or a string), not [1]'),
    ({'image_id': {'id': 1}, 'caption': 'a box'},
     'result 0: image_id must be an integer (or a string), not {"id": 1}'),
    ({'image_id': 1, 'caption': None}, 'result 0: caption must be a string, not null'),
    ({'caption': 'a box'}, "result 0 needs image_id and caption, got {'caption': 'a box'}"),
])
def test_a_bad_result_is_one_line_error(tmp_path, entry, expected):
    """A result whose image_id cannot be a key, or without a caption, is refused by index."""
    results_path, annotations_path = write_hand_made(tmp_path)
    results_path.write_text(json.dumps([entry]))
    assert expected in score_files_error(results_path, annotations_path)


def test_string_ids_against_integer_ids_name_the_type_mismatch(tmp_path):
    """Results with "image_id": "1" against integer ids say that the types differ."""
    results_path, annotations_path = write_hand_made(tmp_path)
    results_path.write_text(json.dumps([{'image_id': str(key), 'caption': text}
                                        for key, text in PREDICTIONS.items()]))
    message = score_files_error(results_path, annotations_path)
    assert ("3 predicted image(s) have no references, e.g. image '1' (an image_id of type "
            "str, but the references' ids are int: use the same type in both files)") in message
    results_path.write_text(json.dumps([{'image_id': 99, 'caption': 'a box'}]))
    message = score_files_error(results_path, annotations_path)
    assert message.endswith('e.g. image 99')


def test_results_files_are_replaced_whole(tmp_path):
    """A write that fails half-way leaves the previous file as it was, and no other file."""
    path = tmp_path / 'eval' / 'results_model.json'
    evaluate.write_json(path, [{'image_id': 1, 'caption': 'one red box'}])
    before = path.read_bytes()

    with pytest.raises(TypeError):
        evaluate.write_json(path, [{'image_id': 1, 'caption': 'two red boxes'},
                                   {'image_id': 2, 'caption': object()}])

    assert path.read_bytes() == before
    assert [entry.name for entry in path.parent.iterdir()] == ['results_model.json']


def make_dataset(folder, captions):
    """Write a dataset folder whose val split holds one 64x64 image per caption."""
    (folder / 'images').mkdir(parents=True)
    annotations = {'info': {}, 'licenses': [], 'images': [], 'annotations': []}
    lines = []
    rng = np.random.default_rng(0)
    for index, caption in enumerate(captions, start=1):
        name = f'frame_{index:03d}.png'
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / 'images' / name)
        annotations['images'].append({'id': index, 'file_name': name, 'width': 64,
                                      'height': 64})
        annotations['annotations'].append({'id': index, 'image_id': index, 'caption': caption})
        lines.append(json.dumps({'image_id': index, 'file_name': name, 'captions': [caption]}))
    (folder / 'annotations.json').write_text(json.dumps(annotations))
    (folder / 'val_split.jsonl').write_text('\n'.join(lines) + '\n')
    return folder


# Metrics without Java start-up: model-mode tests are about captions, not METEOR.
QUICK_METRICS = ['--metrics', 'Bleu,ROUGE_L,CIDEr,exact_match', '--tokenizer', 'simple']


def captions_by_prompt(model, frames, prompts):
    """Caption ``frames`` with Blip2Captioner once per prompt: ``{prompt: [caption, ...]}``."""
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig

    captioner = Blip2Captioner(CaptionerConfig(model=str(model), max_new_tokens=6))
    expected = {prompt: captioner.caption(frames, prompt=prompt) for prompt in prompts}
    # Otherwise a wrong prompt could not show in the results.
    assert len({tuple(captions) for captions in expected.values()}) == len(prompts), expected
    return expected


def copy_with_prompt(checkpoint, folder, prompt):
    """Copy a checkpoint and save a training prompt beside it, as training.train does."""
    shutil.copytree(checkpoint, folder)
    (folder / TRAINING_INFO_FILE).write_text(json.dumps({'prompt': prompt}))
    return folder


def result_captions(out, title):
    """Return the captions of ``results_<title>.json`` in image order 1, 2, 3."""
    results = json.loads((out / f'results_{title}.json').read_text())
    assert [entry['image_id'] for entry in results] == [1, 2, 3]
    return [entry['caption'] for entry in results]


def test_model_mode_and_comparison_use_each_folders_prompt(
        tmp_path, lively_opt_checkpoint, capsys, one_torch_thread):
    """Model and baseline caption with their own saved prompts and share one table."""
    from training.data import load_rgb

    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes', 'a robot arm'])
    frames = [load_rgb(data / 'images' / f'frame_{index:03d}.png') for index in (1, 2, 3)]
    expected = captions_by_prompt(lively_opt_checkpoint, frames, ['a photo of', 'a picture of'])
    # Same weights, different training prompts: only the prompt can tell their captions apart.
    tuned = copy_with_prompt(lively_opt_checkpoint, tmp_path / 'tuned', 'a photo of')
    baseline = copy_with_prompt(lively_opt_checkpoint, tmp_path / 'baseline', 'a picture of')
    out = tmp_path / 'eval'

    assert evaluate.main(['--model', str(tuned), '--compare', str(baseline), '--data', str(data),
                          '--out', str(out), '--max_new_tokens', '6', *QUICK_METRICS]) == 0

    table = capsys.readouterr().out
    assert 'baseline' in table and 'change' in table and 'CIDEr' in table
    assert result_captions(out, 'model') == expected['a photo of']
    assert result_captions(out, 'baseline') == expected['a picture of']
    report = json.loads((out / 'metrics.json').read_text())
    assert report['prompt'] == 'a photo of'
    assert report['models']['model']['prompt'] == 'a photo of'
    assert report['models']['baseline']['prompt'] == 'a picture of'
    for title in ('baseline', 'model'):
        scores = report['models'][title]['scores']
        assert {'Bleu_4', 'ROUGE_L', 'CIDEr', 'exact_match'} == set(scores) - {
            'Bleu_1', 'Bleu_2', 'Bleu_3'}


def test_explicit_prompt_is_for_both_and_a_baseline_without_one_gets_the_models(
        tmp_path, lively_opt_checkpoint, one_torch_thread):
    """--prompt overrides every saved prompt; a never-trained baseline borrows the model's."""
    from training.data import load_rgb

    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes', 'a robot arm'])
    frames = [load_rgb(data / 'images' / f'frame_{index:03d}.png') for index in (1, 2, 3)]
    expected = captions_by_prompt(lively_opt_checkpoint, frames,
                                  ['a photo of', 'a picture of', 'an image of'])
    tuned = copy_with_prompt(lively_opt_checkpoint, tmp_path / 'tuned', 'a photo of')
    baseline = copy_with_prompt(lively_opt_checkpoint, tmp_path / 'baseline', 'a picture of')
    common = ['--data', str(data), '--max_new_tokens', '6', '--max_images', '3',
              *QUICK_METRICS]

    explicit = tmp_path / 'explicit'
    assert evaluate.main(['--model', str(tuned), '--compare', str(baseline), '--out',
                          str(explicit), '--prompt', 'an image of', *common]) == 0
    assert result_captions(explicit, 'model') == expected['an image of']
    assert result_captions(explicit, 'baseline') == expected['an image of']

    # The builder's folder has no training prompt, like a hub checkpoint.
    assert not (lively_opt_checkpoint / TRAINING_INFO_FILE).exists()
    borrowed = tmp_path / 'borrowed'
    assert evaluate.main(['--model', str(tuned), '--compare', str(lively_opt_checkpoint),
                          '--out', str(borrowed), *common]) == 0
    assert result_captions(borrowed, 'baseline') == expected['a photo of']
    report = json.loads((borrowed / 'metrics.json').read_text())
    assert report['models']['baseline']['prompt'] == 'a photo of'


def test_a_model_that_fails_leaves_the_output_folder_as_it_was(
        tmp_path, lively_opt_checkpoint, one_torch_thread):
    """With --compare, the baseline's results are not written when the model cannot load."""
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes'])
    out = tmp_path / 'eval'
    out.mkdir()
    (out / 'metrics.json').write_text('{"from": "an earlier run"}')

    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--model', str(tmp_path / 'no-such-model'), '--compare',
                       str(lively_opt_checkpoint), '--data', str(data), '--out', str(out),
                       '--max_new_tokens', '3', *QUICK_METRICS])

    assert 'no-such-model' in str(raised.value)
    assert [entry.name for entry in out.iterdir()] == ['metrics.json']
    assert (out / 'metrics.json').read_text() == '{"from": "an earlier run"}'


def test_a_model_with_code_of_its_own_is_evaluated_only_with_trust_remote_code(
        tmp_path, lively_opt_checkpoint, code_of_its_own, one_torch_thread):
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes', 'a robot arm'])
    model = code_of_its_own(lively_opt_checkpoint)
    common = ['--data', str(data), '--max_new_tokens', '3', *QUICK_METRICS]
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--model', str(model), '--out', str(tmp_path / 'refused'), *common])
    assert 'trust_remote_code' in str(raised.value) and not (tmp_path / 'refused').exists()
    for name, folder, trust in (('trusted', model, ['--trust_remote_code']),
                                ('plain', lively_opt_checkpoint, [])):
        assert evaluate.main(['--model', str(folder), '--out', str(tmp_path / name), *trust,
                              *common]) == 0
    assert result_captions(tmp_path / 'trusted', 'model') == result_captions(
        tmp_path / 'plain', 'model')


def test_ctrl_c_during_the_second_model_writes_nothing(
        tmp_path, lively_opt_checkpoint, one_torch_thread, monkeypatch, capsys):
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes'])
    out = tmp_path / 'eval'
    out.mkdir()
    (out / 'metrics.json').write_text('{"from": "an earlier run"}')
    caption_split = evaluate.caption_split
    calls = []

    def interrupted_second_time(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return caption_split(*args, **kwargs)

    monkeypatch.setattr(evaluate, 'caption_split', interrupted_second_time)
    status = evaluate.main(['--model', str(lively_opt_checkpoint), '--compare',
                            str(lively_opt_checkpoint), '--data', str(data), '--out', str(out),
                            '--max_new_tokens', '3', *QUICK_METRICS])

    assert status == 130 and len(calls) == 2
    assert 'evaluate: interrupted' in capsys.readouterr().err
    assert [entry.name for entry in out.iterdir()] == ['metrics.json']
    assert (out / 'metrics.json').read_text() == '{"from": "an earlier run"}'


def test_a_caption_of_an_unknown_image_is_refused_before_captioning(tmp_path):
    """Model mode checks the dataset as training does, instead of scoring fewer images."""
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes'])
    annotations = json.loads((data / 'annotations.json').read_text())
    annotations['annotations'][0]['image_id'] = 99
    (data / 'annotations.json').write_text(json.dumps(annotations))
    out = tmp_path / 'eval'

    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--model', str(tmp_path / 'not-loaded'), '--data', str(data),
                       '--out', str(out), *QUICK_METRICS])

    message = str(raised.value)
    assert message.startswith('error: ') and '\n' not in message
    assert "annotations[0] (id 1): image_id 99 is not an image's id" in message
    assert not out.exists()


def test_metrics_option_computes_only_the_chosen_metrics(tmp_path, capsys):
    """--metrics leaves the others out (METEOR too, so no Java start-up) with the same values."""
    results_path, annotations_path = write_hand_made(tmp_path)
    full = evaluate.score_captions(REFERENCES, PREDICTIONS, tokenizer='simple',
                                   metrics=('Bleu', 'ROUGE_L', 'CIDEr', 'exact_match'))
    out = tmp_path / 'scores'

    assert evaluate.main(['--results', str(results_path), '--annotations',
                          str(annotations_path), '--out', str(out), '--tokenizer', 'simple',
                          '--metrics', 'bleu_4, CIDEr,exact_match']) == 0

    table = capsys.readouterr().out
    assert 'METEOR' not in table and 'ROUGE_L' not in table and 'SPICE' not in table
    report = json.loads((out / 'metrics.json').read_text())['models']['results']
    assert set(report['scores']) == {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'CIDEr',
                                     'exact_match'}
    assert report['unavailable'] == {}
    for name, value in report['scores'].items():
        assert value == pytest.approx(full.scores[name], abs=1e-12), name
    assert report['scores']['exact_match'] == pytest.approx(2 / 3)

    only_rouge = evaluate.score_captions(REFERENCES, PREDICTIONS, tokenizer='simple',
                                         metrics=evaluate.parse_metrics('ROUGE_L'))
    assert set(only_rouge.scores) == {'ROUGE_L'}
    assert evaluate.parse_metrics('all') == evaluate.parse_metrics('') == evaluate.ALL_METRICS


def test_unknown_metric_is_a_one_line_error(tmp_path):
    """A misspelt metric name is refused before any scoring, with the names to choose from."""
    results_path, annotations_path = write_hand_made(tmp_path)
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--results', str(results_path), '--annotations',
                       str(annotations_path), '--metrics', 'Bleu,WER'])
    message = str(raised.value)
    assert message.startswith("error: unknown metric 'WER'") and '\n' not in message
    assert 'Bleu,METEOR,ROUGE_L,CIDEr,SPICE,exact_match' in message


def test_model_mode_needs_model_data_and_out():
    """Missing arguments are named in one line."""
    with pytest.raises(SystemExit) as raised:
        evaluate.main(['--model', 'x'])
    assert '--data, --out required' in str(raised.value)


def test_empty_captions_are_counted_and_scored_as_misses():
    """An empty caption is a miss for every metric, not a metric that fails or a skipped image."""
    references = {1: ['two red boxes'], 2: ['nocaption robot arm']}
    scores = evaluate.score_captions(references, {1: 'two red boxes', 2: ' . '},
                                     metrics=('Bleu', 'ROUGE_L', 'CIDEr', 'exact_match'),
                                     tokenizer='simple')
    assert scores.empty_captions == 1 and scores.images == 2
    assert not scores.unavailable
    assert scores.scores['exact_match'] == 0.5
    assert scores.scores['ROUGE_L'] == pytest.approx(0.5)
    # The word an empty caption stands for is in no reference, so it matches nothing.
    assert evaluate.missing_caption_word(references) != 'nocaption'
    full = evaluate.score_captions(references, {1: 'two red boxes', 2: 'nocaption robot arm'},
                                   metrics=('ROUGE_L',), tokenizer='simple')
    assert full.empty_captions == 0 and full.scores['ROUGE_L'] == pytest.approx(1.0)


def test_a_model_that_ends_every_caption_at_once_is_reported_empty(
        tmp_path, lively_opt_checkpoint, capsys, one_torch_thread):
    """A checkpoint whose first token is always the end token: empty captions, counted."""
    from safetensors.torch import load_file, save_file

    silent = tmp_path / 'silent'
    shutil.copytree(lively_opt_checkpoint, silent)
    eos = json.loads((silent / 'generation_config.json').read_text())['eos_token_id']
    weights = load_file(silent / 'model.safetensors')
    # The last layer norm outputs the (long) end token's embedding whatever comes in, and the
    # output layer shares those embeddings: the end token wins at the first step.
    embeddings = weights['language_model.model.decoder.embed_tokens.weight']
    embeddings[eos] *= 100
    norm = 'language_model.model.decoder.final_layer_norm'
    weights[f'{norm}.weight'] = torch.zeros_like(weights[f'{norm}.weight'])
    weights[f'{norm}.bias'] = embeddings[eos].clone()
    save_file(weights, silent / 'model.safetensors', metadata={'format': 'pt'})
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes', 'a robot arm'])
    out = tmp_path / 'out'
    assert evaluate.main(['--model', str(silent), '--compare', str(lively_opt_checkpoint),
                          '--data', str(data), '--out', str(out), '--max_new_tokens', '4',
                          *QUICK_METRICS]) == 0
    assert result_captions(out, 'model') == ['', '', '']
    report = json.loads((out / 'metrics.json').read_text())['models']
    assert report['model']['empty_captions'] == 3
    assert not report['model']['unavailable']
    assert report['model']['scores']['ROUGE_L'] == 0.0
    assert report['model']['scores']['exact_match'] == 0.0
    assert report['baseline']['empty_captions'] == sum(
        not caption.strip() for caption in result_captions(out, 'baseline'))
    assert 'empty captions from model: 3 of 3 (scored as misses)' in capsys.readouterr().out


def test_a_model_worse_than_its_baseline_is_named_in_one_warning(
        tmp_path, lively_opt_checkpoint, tiny_opt_checkpoint, caplog, one_torch_thread):
    """The metrics where fine-tuning lost, each with both values; none when it did not lose."""
    from training.data import load_rgb

    frames_only = make_dataset(tmp_path / 'frames', ['x', 'y', 'z'])
    frames = [load_rgb(frames_only / 'images' / f'frame_{index:03d}.png') for index in (1, 2, 3)]
    references = captions_by_prompt(lively_opt_checkpoint, frames, [''])['']
    # The references are what the baseline says: it scores 1.0, another model less.
    data = make_dataset(tmp_path / 'data', references)
    tuned = tiny_opt_checkpoint
    common = ['--data', str(data), '--max_new_tokens', '6', *QUICK_METRICS]

    assert evaluate.main(['--model', str(tuned), '--compare', str(lively_opt_checkpoint),
                          '--out', str(tmp_path / 'worse'), *common]) == 0
    (warning,) = [record for record in caplog.records
                  if 'below its baseline' in record.getMessage()]
    assert warning.levelname == 'WARNING' and '\n' not in warning.getMessage()
    report = json.loads((tmp_path / 'worse' / 'metrics.json').read_text())['models']
    model, baseline = report['model']['scores'], report['baseline']['scores']
    assert baseline['exact_match'] == 1.0 and model['exact_match'] < 1.0
    assert (f"exact_match {model['exact_match']:.3f} < 1.000" in warning.getMessage())
    caplog.clear()
    assert evaluate.main(['--model', str(lively_opt_checkpoint), '--compare', str(tuned),
                          '--out', str(tmp_path / 'better'), *common]) == 0
    assert 'below its baseline' not in caplog.text


def test_compare_base_scores_the_recorded_base_and_warns_where_tuning_lost(
        tmp_path, lively_opt_checkpoint, tiny_opt_checkpoint, caplog, one_torch_thread):
    """--compare-base finds the base training recorded and names each metric it lost."""
    from training.data import load_rgb

    frames_only = make_dataset(tmp_path / 'frames', ['x', 'y', 'z'])
    frames = [load_rgb(frames_only / 'images' / f'frame_{index:03d}.png') for index in (1, 2, 3)]
    references = captions_by_prompt(lively_opt_checkpoint, frames, [''])['']
    data = make_dataset(tmp_path / 'data', references)
    # A "fine-tuned" folder as training.train leaves it: the base named in its training info.
    tuned = tmp_path / 'tuned'
    shutil.copytree(tiny_opt_checkpoint, tuned)
    (tuned / TRAINING_INFO_FILE).write_text(json.dumps(
        {'prompt': '', 'method': 'full', 'base_model': str(lively_opt_checkpoint)}))
    out = tmp_path / 'out'

    assert evaluate.main(['--model', str(tuned), '--compare-base', '--data', str(data),
                          '--out', str(out), '--max_new_tokens', '6', *QUICK_METRICS]) == 0
    report = json.loads((out / 'metrics.json').read_text())['models']
    assert report['base']['model'] == str(lively_opt_checkpoint)
    assert report['base']['scores']['exact_match'] == 1.0
    assert result_captions(out, 'base') == references
    (warning,) = [record for record in caplog.records
                  if 'below its base' in record.getMessage()]
    assert '\n' not in warning.getMessage()
    assert f"exact_match {report['model']['scores']['exact_match']:.3f} < 1.000" in (
        warning.getMessage())


def test_compare_base_of_an_adapter_is_its_model_and_a_described_base_is_refused(tmp_path):
    """An adapter's base is --model; a base that names no loadable model is a one-line error."""
    assert evaluate.recorded_base('some/base', str(tmp_path / 'adapter')) == 'some/base'
    described = tmp_path / 'described'
    described.mkdir()
    (described / TRAINING_INFO_FILE).write_text(json.dumps(
        {'base_model': 'tiny BLIP-2 built from scratch by training.demo_model'}))
    data = make_dataset(tmp_path / 'data', ['one red box'])
    for model, expected in ((described, 'name the base with --compare'),
                            (tmp_path / 'data', f'no {TRAINING_INFO_FILE}')):
        with pytest.raises(SystemExit) as error:
            evaluate.main(['--model', str(model), '--compare-base', '--data', str(data),
                           '--out', str(tmp_path / 'out')])
        assert expected in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(SystemExit, match='leave out --compare'):
        evaluate.main(['--model', str(described), '--compare-base', '--compare', 'x',
                       '--data', str(data), '--out', str(tmp_path / 'out')])
    assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(not evaluate.java_available(), reason='the PTB tokenizer needs Java')
def test_quiet_by_default_and_verbose_shows_progress(
        tmp_path, lively_opt_checkpoint, capfd, caplog, one_torch_thread):
    """No per-batch lines, Java speed lines or loading bars unless --verbose asks for them."""
    data = make_dataset(tmp_path / 'data', ['one red box', 'two blue boxes', 'a robot arm'])
    common = ['--model', str(lively_opt_checkpoint), '--data', str(data), '--max_new_tokens',
              '6', '--metrics', 'exact_match', '--tokenizer', 'ptb']

    assert evaluate.main([*common, '--out', str(tmp_path / 'quiet')]) == 0
    err = capfd.readouterr().err
    assert 'PTBTokenizer' not in err and 'Loading weights' not in err
    assert 'captioned 3/3' not in caplog.text and 'PTBTokenizer' not in caplog.text
    caplog.clear()
    assert evaluate.main([*common, '--out', str(tmp_path / 'verbose'), '--verbose']) == 0
    assert 'captioned 3/3 images' in caplog.text and 'PTBTokenizer' in caplog.text
    assert evaluate.LOGGER.level == logging.NOTSET
