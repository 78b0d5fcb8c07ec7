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

"""Tests for training.validate and training.split (and re-splits) on datasets written to disk."""

import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from training import bag_to_coco
from training import coco
from training import record_synthetic_bag
from training import split
from training import validate
from training.coco import read_split
from training.validate import check_dataset
from training.validate import DatasetError
from training.validate import validate_dataset

REALDATA = Path(os.environ.get(
    'BLIP2_ROS_REALDATA', Path(__file__).resolve().parents[2] / 'shared' / 'realdata'))
SECOND = 1_000_000_000
ROOT = Path(__file__).resolve().parents[1]


def make_dataset(folder, frames, captions_per_image=1, uncaptioned=()):
    """Write a dataset of tiny PNGs; ``frames`` is a list of (bag, timestamp_ns)."""
    folder = Path(folder)
    (folder / 'images').mkdir(parents=True)
    images, annotations = [], []
    for index, (bag, time_ns) in enumerate(frames, start=1):
        name = f'{bag}__cam__{time_ns}.png'
        pixels = np.full((6, 8, 3), index % 256, dtype=np.uint8)
        cv2.imwrite(str(folder / 'images' / name), pixels)
        images.append({'id': index, 'file_name': name, 'width': 8, 'height': 6, 'bag': bag,
                       'topic': '/cam', 'timestamp_ns': time_ns})
        if index in uncaptioned:
            continue
        for copy in range(captions_per_image):
            annotations.append({'id': len(annotations) + 1, 'image_id': index,
                                'caption': f'frame {index} caption {copy}'})
    data = {'info': {}, 'licenses': [], 'images': images, 'annotations': annotations}
    (folder / 'annotations.json').write_text(json.dumps(data))
    return folder


def _edit(folder, change):
    path = Path(folder) / 'annotations.json'
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _good(tmp_path, count=4):
    return make_dataset(tmp_path / 'data', [('bag', i * SECOND) for i in range(count)])


def test_a_good_dataset_has_no_problems(tmp_path, capsys):
    folder = _good(tmp_path)
    assert validate_dataset(folder) == []
    check_dataset(folder, require_captions=True)
    assert validate.main([str(folder)]) == 0
    assert 'ok (4 images, 4 captions)' in capsys.readouterr().out


def _symlink_out(folder):
    outside = folder.parent / 'elsewhere.png'
    cv2.imwrite(str(outside), np.zeros((6, 8, 3), np.uint8))
    target = folder / 'images' / 'bag__cam__0.png'
    target.unlink()
    target.symlink_to(outside)


def _truncate_image(folder):
    path = folder / 'images' / 'bag__cam__0.png'
    path.write_bytes(path.read_bytes()[:30])


CASES = {
    'missing image': (lambda f: (f / 'images' / 'bag__cam__0.png').unlink(),
                      "images[0] (id 1, 'bag__cam__0.png'): image file", 'does not exist'),
    'unreadable image': (_truncate_image, 'images[0] (id 1', 'cannot be decoded'),
    'not an image': (lambda f: (f / 'images' / 'bag__cam__0.png').write_text('hello'),
                     'images[0] (id 1', 'cannot be decoded'),
    'size mismatch': (lambda f: _edit(f, lambda d: d['images'][1].update(width=80)),
                      'images[1] (id 2', 'is 8x6 but the entry says 80x6'),
    'size as text': (lambda f: _edit(f, lambda d: d['images'][1].update(width='8')),
                     'images[1] (id 2', "width must be a positive integer, not '8' (str)"),
    'size as fraction': (lambda f: _edit(f, lambda d: d['images'][2].update(height=6.0)),
                         'images[2] (id 3', 'height must be a positive integer, not 6.0 (float)'),
    'duplicate image id': (lambda f: _edit(f, lambda d: d['images'][2].update(id=1)),
                           'images[2] (id 1', 'duplicate id, also used by images[0]'),
    'string image id': (lambda f: _edit(f, lambda d: d['images'][0].update(id='1')),
                        "images[0] (id '1'", 'id must be an integer'),
    'duplicate annotation id': (
        lambda f: _edit(f, lambda d: d['annotations'][3].update(id=2)),
        'annotations[3] (id 2)', 'duplicate id, also used by annotations[1]'),
    'empty caption': (lambda f: _edit(f, lambda d: d['annotations'][1].update(caption='  ')),
                      'annotations[1] (id 2)', 'caption is empty'),
    'captions in a list': (
        lambda f: _edit(f, lambda d: d['annotations'][1].update(caption=['a box', 'boxes'])),
        'annotations[1] (id 2)', 'caption must be a string (one caption per annotation), '
        'not list'),
    'caption of no image': (lambda f: _edit(f, lambda d: d['annotations'][0].update(image_id=99)),
                            'annotations[0] (id 1)', "image_id 99 is not an image's id"),
    'caption of a list of images': (
        lambda f: _edit(f, lambda d: d['annotations'][0].update(image_id=[1])),
        'annotations[0] (id 1)', "image_id [1] is not an image's id"),
    'dot dot': (lambda f: _edit(f, lambda d: d['images'][0].update(file_name='../secret.png')),
                "images[0] (id 1, '../secret.png')", "contains '..'"),
    'absolute': (lambda f: _edit(f, lambda d: d['images'][0].update(file_name='/etc/passwd')),
                 "images[0] (id 1, '/etc/passwd')", 'is absolute'),
    'backslash': (lambda f: _edit(f, lambda d: d['images'][0].update(file_name='..\\x.png')),
                  'images[0] (id 1', "uses '\\'"),
    'symlink out': (_symlink_out, 'images[0] (id 1', 'outside'),
    'duplicate file name': (
        lambda f: _edit(f, lambda d: d['images'][3].update(file_name='bag__cam__0.png')),
        'images[3] (id 4', 'duplicate file_name, also used by images[0]'),
    'no annotations file': (lambda f: (f / 'annotations.json').unlink(),
                            'annotations.json does not exist', ''),
    'not json': (lambda f: (f / 'annotations.json').write_text('{"images": ['),
                 'annotations.json is not valid JSON', ''),
    'not coco': (lambda f: (f / 'annotations.json').write_text('{"images": []}'),
                 "has no 'annotations' list", ''),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_each_problem_is_found_and_names_its_entry(tmp_path, capsys, case):
    folder = _good(tmp_path)
    breaks, where, what = CASES[case]
    breaks(folder)
    problems = validate_dataset(folder)
    # Changing an image's id also leaves the captions of the old id pointing at nothing.
    assert len(problems) == (2 if case.endswith('image id') else 1), problems
    assert where in problems[0] and what in problems[0]
    assert not any('\n' in problem for problem in problems)
    with pytest.raises(DatasetError) as caught:
        check_dataset(folder)
    assert where in str(caught.value)
    assert validate.main([str(folder)]) == 1
    assert capsys.readouterr().out.splitlines() == problems


def test_symlink_inside_the_dataset_is_fine_and_no_decode_skips_decoding(tmp_path):
    folder = _good(tmp_path)
    target = folder / 'images' / 'bag__cam__0.png'
    (folder / 'images' / 'copy.png').symlink_to(target)
    _edit(folder, lambda d: d['images'][0].update(file_name='copy.png'))
    assert validate_dataset(folder) == []
    _truncate_image(folder)
    assert len(validate_dataset(folder)) == 1
    assert validate_dataset(folder, decode_images=False) == []


def test_training_can_require_captions(tmp_path):
    folder = make_dataset(tmp_path / 'd', [('bag', 0)], uncaptioned={1})
    check_dataset(folder)
    with pytest.raises(DatasetError, match='has no captions to train on'):
        check_dataset(folder, require_captions=True)


def test_a_dataset_made_from_real_bags_validates(tmp_path):
    spot = REALDATA / 'ros1' / 'ctu_image_transport_codecs'
    if not spot.is_dir():
        pytest.fail(f'real test bags not found at {REALDATA}; set BLIP2_ROS_REALDATA')
    options = bag_to_coco.ConversionOptions(
        image_topics=['/spot/camera/hand_mono/image', '/spot/camera/hand_mono/image/compressed'],
        out=str(tmp_path / 'spot'))
    bag_to_coco.convert_bags([spot / 'raw' / 'raw.bag', spot / 'compressed' / 'compressed.bag'],
                             options)
    assert validate_dataset(tmp_path / 'spot') == []
    (tmp_path / 'spot' / 'images' /
     read_images(tmp_path / 'spot')[0]['file_name']).write_bytes(b'\xff\xd8broken')
    assert len(validate_dataset(tmp_path / 'spot')) == 1


def test_a_dataset_gets_the_permissions_of_any_new_file(tmp_path):
    """Whoever may read the user's files (another user, a training container) can read it."""
    folder = append_recording(tmp_path, 'line.bag', START_SEC, seed=0)
    split.split_dataset(folder, 0.3, seed=0, block_seconds=1)
    (tmp_path / 'plain').mkdir()
    (tmp_path / 'plain.txt').write_text('')
    folder_mode = (tmp_path / 'plain').stat().st_mode
    file_mode = (tmp_path / 'plain.txt').stat().st_mode

    assert folder.stat().st_mode == folder_mode
    assert (folder / 'images').stat().st_mode == folder_mode
    for name in ('annotations.json', 'train_split.jsonl', 'val_split.jsonl',
                 f"images/{read_images(folder)[0]['file_name']}"):
        assert (folder / name).stat().st_mode == file_mode, name


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='Linux reports the umask')
def test_the_usual_mode_is_read_without_touching_the_umask(tmp_path, monkeypatch):
    # Setting the umask to read it would give a file another thread creates meanwhile umask 0.
    previous = os.umask(0o027)
    try:
        (tmp_path / 'plain.txt').write_text('')
        (tmp_path / 'plain').mkdir()
        with monkeypatch.context() as patch:
            patch.setattr(os, 'umask', lambda mask: pytest.fail('the umask was changed'))
            file_mode, folder_mode = coco.usual_mode(), coco.usual_mode(folder=True)
    finally:
        os.umask(previous)
    assert file_mode == (tmp_path / 'plain.txt').stat().st_mode & 0o777 == 0o640
    assert folder_mode == (tmp_path / 'plain').stat().st_mode & 0o777 == 0o750


def read_images(folder):
    return json.loads((Path(folder) / 'annotations.json').read_text())['images']


def _recording(tmp_path):
    """Two bags, one frame a second for 100 s each, plus two uncaptioned frames."""
    frames = [('line_a', 1000 * SECOND + i * SECOND) for i in range(100)]
    frames += [('line_b', 5000 * SECOND + i * SECOND) for i in range(100)]
    frames += [('line_b', 6000 * SECOND), ('line_b', 6001 * SECOND)]
    return make_dataset(tmp_path / 'rec', frames, captions_per_image=2, uncaptioned={201, 202})


def test_split_keeps_time_blocks_together(tmp_path, capsys):
    folder = _recording(tmp_path)
    assert split.main([str(folder), '--val-fraction', '0.2', '--seed', '3',
                       '--block-seconds', '10']) == 0
    stdout = capsys.readouterr().out
    train = read_split(folder / 'train_split.jsonl')
    val = read_split(folder / 'val_split.jsonl')
    assert len(train) + len(val) == 200
    assert len(val) == 40
    assert 'left out: 2 images without a caption' in stdout
    assert not {r['image_id'] for r in train} & {r['image_id'] for r in val}
    assert all(len(r['captions']) == 2 for r in train + val)
    assert val[0]['captions'] == [f"frame {val[0]['image_id']} caption 0",
                                  f"frame {val[0]['image_id']} caption 1"]
    starts = {'line_a': 1000 * SECOND, 'line_b': 5000 * SECOND}

    def block(record):
        return record['bag'], (record['timestamp_ns'] - starts[record['bag']]) // (10 * SECOND)

    val_blocks = {block(r) for r in val}
    assert len(val_blocks) == 4
    assert not val_blocks & {block(r) for r in train}
    # Neighbouring frames one second apart are on the same side except at block edges.
    sides = {(r['bag'], r['timestamp_ns']): 'val' for r in val}
    sides.update({(r['bag'], r['timestamp_ns']): 'train' for r in train})
    for bag, start in starts.items():
        changes = [i for i in range(1, 100) if sides[(bag, start + i * SECOND)] !=
                   sides[(bag, start + (i - 1) * SECOND)]]
        assert all(i % 10 == 0 for i in changes)


def test_split_asks_for_a_review_of_captions_a_model_wrote(tmp_path, capsys):
    folder = _recording(tmp_path)
    assert split.main([str(folder), '--val-fraction', '0.2']) == 0
    assert 'review:' not in capsys.readouterr().out

    def auto_caption_three(data):
        for note in data['annotations'][:3]:
            note.update(machine_generated=True, model='blip2')
        data['annotations'][3]['machine_generated'] = False  # reviewed

    _edit(folder, auto_caption_three)
    assert split.main([str(folder), '--val-fraction', '0.2']) == 0
    assert 'review: 3 captions were written by a model and not checked yet' in (
        capsys.readouterr().out)


def test_split_is_deterministic_per_seed(tmp_path):
    folder = _recording(tmp_path)
    results = []
    for seed in (1, 1, 2):
        split.split_dataset(folder, 0.2, seed=seed, block_seconds=10, reshuffle=True)
        results.append(((folder / 'train_split.jsonl').read_bytes(),
                        (folder / 'val_split.jsonl').read_bytes()))
    assert results[0] == results[1]
    assert results[0] != results[2]


def test_frames_without_time_are_split_one_by_one(tmp_path):
    folder = _good(tmp_path, count=10)
    _edit(folder, lambda d: [image.pop('timestamp_ns') for image in d['images']])
    summary = split.split_dataset(folder, 0.3, seed=0)
    assert (summary.train_images, summary.val_images) == (7, 3)
    assert summary.val_blocks == 3


@pytest.mark.parametrize('args, expected', [
    (['--val-fraction', '1.0'], '--val-fraction must be at least 0 and below 1'),
    (['--val-fraction', '-0.1'], '--val-fraction must be at least 0 and below 1'),
    (['--block-seconds', '0'], '--block-seconds must be above 0'),
    (['--val-fraction', '0.5', '--block-seconds', '1000'], 'only one time block'),
])
def test_split_rejects_bad_requests(tmp_path, capsys, args, expected):
    folder = _good(tmp_path)
    assert split.main([str(folder), *args]) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith('split: error: ') and expected in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (folder / 'train_split.jsonl').exists()


def test_split_refuses_an_invalid_dataset(tmp_path, capsys):
    folder = _good(tmp_path)
    (folder / 'images' / 'bag__cam__0.png').unlink()
    assert split.main([str(folder)]) == 1
    stderr = capsys.readouterr().err
    assert 'is not usable' in stderr and 'does not exist' in stderr
    assert 'python -m training.validate' in stderr
    assert not (folder / 'val_split.jsonl').exists()


def test_sizes_that_are_not_integers_are_found_without_decoding(tmp_path):
    folder = _good(tmp_path)
    _edit(folder, lambda d: d['images'][0].update(width='8'))
    problems = validate_dataset(folder, decode_images=False)
    assert problems == ["images[0] (id 1, 'bag__cam__0.png'): width must be a positive "
                        "integer, not '8' (str)"]


# Re-splitting: what an existing split said stays true.

START_SEC = 1767225600
FRAMES = 60  # 6 s at 10 Hz: six blocks of one second per bag


def append_recording(root, bag_name, start_sec, seed):
    """Record a synthetic factory bag and append it to root/data with bag_to_coco."""
    bag = root / bag_name
    assert record_synthetic_bag.main([
        '--out', str(bag), '--frames', str(FRAMES), '--size', '32x24', '--kinds', 'box',
        '--start-sec', str(start_sec), '--seed', str(seed)]) == 0
    assert bag_to_coco.main([str(bag), '--image-topic', '/camera/image_raw',
                             '--caption-topic', '/factory/true_caption',
                             '--out', str(root / 'data'), '--quiet']) == 0
    return root / 'data'


def sides_by_file(folder):
    """Return ``{file_name: 'train' | 'val'}`` from the split files of ``folder``."""
    sides = {}
    for side in ('train', 'val'):
        for record in read_split(Path(folder) / f'{side}_split.jsonl'):
            assert record['file_name'] not in sides, record
            sides[record['file_name']] = side
    return sides


def block_of(file_name, start_sec):
    """Return the one-second block of a bag_to_coco file name (bag__topic__stamp.jpg)."""
    bag, _, stamp = file_name.rsplit('.', 1)[0].split('__')
    return bag, (int(stamp) - start_sec * SECOND) // SECOND


def test_resplit_after_appending_a_bag_keeps_every_images_side(tmp_path, capsys):
    data = append_recording(tmp_path, 'monday', START_SEC, seed=0)
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    before = sides_by_file(data)
    assert sorted(before.values()).count('val') == 20
    capsys.readouterr()

    append_recording(tmp_path, 'tuesday', START_SEC + 86400, seed=1)
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    stdout = capsys.readouterr().out
    after = sides_by_file(data)

    # A model trained on the first train split is never scored on frames it trained on.
    assert {name: after[name] for name in before} == before
    assert len(after) == 2 * FRAMES
    assert 'kept: 60 images of the existing split files stay on their side' in stdout
    # Only new blocks were assigned, and whole: one more second of tuesday went to val.
    tuesday = {name: side for name, side in after.items() if name.startswith('tuesday__')}
    blocks = {}
    for name, side in tuesday.items():
        blocks.setdefault(block_of(name, START_SEC + 86400), set()).add(side)
    assert all(len(block_sides) == 1 for block_sides in blocks.values())
    assert list(tuesday.values()).count('val') == 10
    assert 'new: 50 to train, 10 to val' in stdout
    assert 'val holds 25.0% of the images (asked 20.0%)' in stdout
    # The same request again changes nothing.
    files = [(data / name).read_bytes() for name in ('train_split.jsonl', 'val_split.jsonl')]
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    assert [(data / name).read_bytes()
            for name in ('train_split.jsonl', 'val_split.jsonl')] == files


def test_reshuffle_splits_as_if_there_were_no_split_files(tmp_path, capsys):
    data = append_recording(tmp_path, 'monday', START_SEC, seed=0)
    assert split.main([str(data), '--val-fraction', '0.3', '--block-seconds', '1',
                       '--seed', '5']) == 0
    append_recording(tmp_path, 'tuesday', START_SEC + 86400, seed=1)
    capsys.readouterr()
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1',
                       '--reshuffle']) == 0
    stdout = capsys.readouterr().out
    assert 'reshuffled: images may have changed sides' in stdout and 'kept:' not in stdout
    reshuffled = sides_by_file(data)
    for name in ('train_split.jsonl', 'val_split.jsonl'):
        (data / name).unlink()
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    assert sides_by_file(data) == reshuffled
    with pytest.raises(SystemExit):
        split.main(['--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    assert '--reshuffle' in help_text and 'split every block anew' in help_text


def test_new_frames_join_the_side_of_their_block_and_removed_ones_are_dropped(
        tmp_path, capsys):
    # Every other frame first, as a converter with --every-n 2 would give; then all of them,
    # numbered anew, minus the first ten seconds.
    times = [('line', 1000 * SECOND + i * SECOND) for i in range(100)]
    first = make_dataset(tmp_path / 'first', times[::2])
    assert split.main([str(first), '--val-fraction', '0.3', '--block-seconds', '10']) == 0
    before = sides_by_file(first)
    data = make_dataset(tmp_path / 'data', times[10:])
    for name in ('train_split.jsonl', 'val_split.jsonl'):
        (data / name).write_bytes((first / name).read_bytes())
    capsys.readouterr()

    assert split.main([str(data), '--val-fraction', '0.3', '--block-seconds', '10']) == 0
    stdout = capsys.readouterr().out
    after = sides_by_file(data)
    assert len(after) == 90
    assert all(after[name] == side for name, side in before.items() if name in after)
    blocks = {}
    for name, side in after.items():
        blocks.setdefault(int(name.split('__')[2].split('.')[0]) // (10 * SECOND),
                          set()).add(side)
    assert all(len(block_sides) == 1 for block_sides in blocks.values())
    assert 'kept: 45 images' in stdout and 'new: ' in stdout
    assert 'dropped: 5 images of the existing split files are no longer captioned' in stdout


# At 0.3 no ten-second block has a val majority: val holds only the old val images, which
# split once counted as none and refused.
@pytest.mark.parametrize('val_fraction', ['0.5', '0.3'])
def test_a_resplit_with_longer_blocks_keeps_old_sides_and_follows_their_majority(
        tmp_path, capsys, val_fraction):
    # Every other frame split in one-second blocks; then all frames split in ten-second
    # blocks, each of which holds old frames of both sides.
    times = [('line', 1000 * SECOND + i * SECOND) for i in range(100)]
    first = make_dataset(tmp_path / 'first', times[::2])
    assert split.main([str(first), '--val-fraction', val_fraction, '--block-seconds', '1']) == 0
    before = sides_by_file(first)
    data = make_dataset(tmp_path / 'data', times)
    for name in ('train_split.jsonl', 'val_split.jsonl'):
        (data / name).write_bytes((first / name).read_bytes())
    assert split.main([str(data), '--val-fraction', val_fraction, '--block-seconds', '10']) == 0
    after = sides_by_file(data)
    assert {name: after[name] for name in before} == before
    mixed = 0
    for block in range(10):
        names = [f'line__cam__{time_ns}.png' for _, time_ns in times[block * 10:block * 10 + 10]]
        old = [before[name] for name in names if name in before]
        new = {after[name] for name in names if name not in before}
        majority = 'val' if old.count('val') > old.count('train') else 'train'
        assert new == {majority}, (block, old, new)
        mixed += len(set(old)) == 2
    assert mixed >= 3


def test_cameras_of_one_bag_at_the_same_moment_are_on_the_same_side(tmp_path):
    folder = make_dataset(tmp_path / 'data', [('line', 1000 * SECOND + i * SECOND)
                                              for i in range(100)])

    def add_second_camera(data):
        for image in list(data['images']):
            name = image['file_name'].replace('__cam__', '__cam2__')
            (folder / 'images' / name).write_bytes(
                (folder / 'images' / image['file_name']).read_bytes())
            copy = dict(image, id=image['id'] + 100, file_name=name, topic='/cam2')
            data['images'].append(copy)
            data['annotations'].append({'id': copy['id'], 'image_id': copy['id'],
                                        'caption': f"camera 2 frame {image['id']}"})

    _edit(folder, add_second_camera)
    assert validate_dataset(folder) == []
    split.split_dataset(folder, 0.3, seed=0, block_seconds=1)
    sides = {}
    for side in ('train', 'val'):
        for record in read_split(folder / f'{side}_split.jsonl'):
            sides.setdefault(record['timestamp_ns'], set()).add(side)
    assert len(sides) == 100
    assert all(len(moment) == 1 for moment in sides.values()), sides


def test_bags_recorded_at_the_same_time_or_one_after_another_are_one_recording(tmp_path):
    # Two cameras, each recorded into a bag of its own at the same time, and a second part of
    # the left camera's recording starting 2 s after the first part ends: frames of the same
    # ten seconds must be on one side whichever bag holds them.
    start = 1000 * SECOND
    frames = [('cam_left', start + i * SECOND) for i in range(96)]
    frames += [('cam_right', start + 400_000_000 + i * SECOND) for i in range(96)]
    frames += [('cam_left_part2', start + 97 * SECOND + i * SECOND) for i in range(23)]
    folder = make_dataset(tmp_path / 'data', frames)
    summary = split.split_dataset(folder, 0.3, seed=0, block_seconds=10)
    assert summary.train_blocks + summary.val_blocks == 12
    sides = {}
    for side in ('train', 'val'):
        for record in read_split(folder / f'{side}_split.jsonl'):
            sides.setdefault((record['timestamp_ns'] - start) // (10 * SECOND), set()).add(side)
    assert len(sides) == 12 and {'train', 'val'} == set().union(*sides.values())
    assert all(len(block) == 1 for block in sides.values()), sides
    # Bags a day apart stay recordings of their own, each cut from its own start: 10 blocks
    # each (cut from the first bag's start, the second's 96 s would touch 11 blocks).
    next_day = start + 86405 * SECOND
    apart = make_dataset(tmp_path / 'apart', frames[:96] + [
        ('cam_next_day', next_day + i * SECOND) for i in range(96)])
    summary = split.split_dataset(apart, 0.3, seed=0, block_seconds=10)
    assert summary.train_blocks + summary.val_blocks == 20


def test_existing_split_files_that_contradict_each_other_are_refused(tmp_path, capsys):
    folder = _recording(tmp_path)
    assert split.main([str(folder), '--val-fraction', '0.2', '--block-seconds', '10']) == 0
    train_line = (folder / 'train_split.jsonl').read_text().splitlines()[0]
    with open(folder / 'val_split.jsonl', 'a', encoding='utf-8') as stream:
        stream.write(train_line + '\n')
    capsys.readouterr()
    assert split.main([str(folder)]) == 1
    stderr = capsys.readouterr().err
    assert 'is in both train_split.jsonl and val_split.jsonl' in stderr and '--reshuffle' in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert split.main([str(folder), '--reshuffle', '--block-seconds', '10']) == 0
    (folder / 'train_split.jsonl').write_text('{"image_id": "abc"}\n')
    assert split.main([str(folder)]) == 1
    stderr = capsys.readouterr().err
    assert "train_split.jsonl line 1: image_id must be an integer, not 'abc'" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_asking_for_val_after_a_split_without_it_needs_reshuffle(tmp_path, capsys):
    folder = _recording(tmp_path)
    assert split.main([str(folder), '--val-fraction', '0', '--block-seconds', '10']) == 0
    capsys.readouterr()
    assert split.main([str(folder), '--val-fraction', '0.2', '--block-seconds', '10']) == 1
    stderr = capsys.readouterr().err
    assert 'put no image in val and there is no new block' in stderr and '--reshuffle' in stderr
    assert len(read_split(folder / 'val_split.jsonl')) == 0
    assert split.main([str(folder), '--val-fraction', '0.2', '--block-seconds', '10',
                       '--reshuffle']) == 0
    assert len(read_split(folder / 'val_split.jsonl')) == 40


def _split_files(folder):
    names = ('train_split.jsonl', 'val_split.jsonl')
    return {name: (folder / name).read_bytes() for name in names}


def test_an_interrupt_while_replacing_leaves_both_new_split_files(tmp_path):
    folder = _recording(tmp_path)
    split.split_dataset(folder, 0.2, seed=1, block_seconds=10)
    old = _split_files(folder)
    # Ctrl-C arrives right after the first file is replaced. A real SIGINT, sent in a process
    # of its own, as a user's Ctrl-C reaches the command, not to every thread of the test run.
    script = textwrap.dedent("""
        import os, signal, sys
        from training import split
        replace = os.replace
        def interrupted_replace(source, destination):
            replace(source, destination)
            os.kill(os.getpid(), signal.SIGINT)
        os.replace = interrupted_replace
        split.split_dataset(sys.argv[1], 0.2, seed=2, block_seconds=10, reshuffle=True)
    """)
    result = subprocess.run([sys.executable, '-c', script, str(folder)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'KeyboardInterrupt' in result.stderr, result.stderr
    new = _split_files(folder)
    assert new['train_split.jsonl'] != old['train_split.jsonl']
    assert new['val_split.jsonl'] != old['val_split.jsonl']
    split.split_dataset(folder, 0.2, seed=2, block_seconds=10, reshuffle=True)
    assert _split_files(folder) == new
    assert sorted(path.name for path in folder.iterdir()) == [
        'annotations.json', 'images', 'train_split.jsonl', 'val_split.jsonl']


def test_a_failure_while_writing_leaves_the_old_split_files(tmp_path, monkeypatch):
    folder = _recording(tmp_path)
    split.split_dataset(folder, 0.2, seed=1, block_seconds=10)
    old = _split_files(folder)
    write_temporary = coco.write_temporary
    calls = []

    def disk_full_on_second_file(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, 'No space left on device')
        return write_temporary(path, text)

    monkeypatch.setattr(coco, 'write_temporary', disk_full_on_second_file)
    with pytest.raises(OSError):
        split.split_dataset(folder, 0.2, seed=2, block_seconds=10, reshuffle=True)
    assert len(calls) == 2
    assert _split_files(folder) == old
    assert sorted(path.name for path in folder.iterdir()) == [
        'annotations.json', 'images', 'train_split.jsonl', 'val_split.jsonl']
