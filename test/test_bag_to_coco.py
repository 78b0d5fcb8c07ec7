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
End-to-end tests of training.bag_to_coco on bags written with the rosbags writers.

Each test writes real rosbag2 (sqlite3, mcap) or ROS 1 bags with Image, CompressedImage and
String topics, runs the converter through ``main()`` like a user would, and checks every image
and caption in the output against what was written.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from rosbags.rosbag1 import Writer as Rosbag1Writer
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Rosbag2Writer
from rosbags.typesys import get_typestore
from rosbags.typesys import Stores
from training import bag_to_coco
from training.coco import read_annotations
from training.dataset_writer import dataset_lock
from training.validate import validate_dataset

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get(
    'BLIP2_ROS_REALDATA', REPO.parent / 'shared' / 'realdata'))

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
STRING = 'std_msgs/msg/String'
ROS1_TYPES = get_typestore(Stores.ROS1_NOETIC)
ROS2_TYPES = get_typestore(Stores.ROS2_KILTED)
T0 = 1_700_000_000_000_000_000
MS = 1_000_000
STORAGES = ['sqlite3', 'mcap', 'ros1']


@pytest.fixture(scope='module')
def realdata():
    if not (REALDATA / 'SOURCES.md').is_file():
        pytest.fail(f'real test bags not found at {REALDATA}; set BLIP2_ROS_REALDATA')
    return REALDATA


def _message(types, msgtype, time_ns, fields, ros1):
    if msgtype == STRING:
        return types.types[STRING](data=fields['data'])
    stamp = types.types['builtin_interfaces/msg/Time'](
        sec=time_ns // 1_000_000_000, nanosec=time_ns % 1_000_000_000)
    header_type = types.types['std_msgs/msg/Header']
    header = (header_type(seq=0, stamp=stamp, frame_id='camera') if ros1
              else header_type(stamp=stamp, frame_id='camera'))
    data = np.frombuffer(fields['data'], dtype=np.uint8).copy()
    if msgtype == COMPRESSED:
        return types.types[COMPRESSED](header=header, format=fields['format'], data=data)
    return types.types[IMAGE](
        header=header, height=fields['height'], width=fields['width'],
        encoding=fields['encoding'], is_bigendian=fields.get('is_bigendian', 0),
        step=fields['step'], data=data)


def write_bag(folder, name, storage, records):
    """Write ``records`` of (topic, msgtype, time_ns, fields) and return the bag's path."""
    ros1 = storage == 'ros1'
    types = ROS1_TYPES if ros1 else ROS2_TYPES
    if ros1:
        path = Path(folder) / f'{name}.bag'
        writer = Rosbag1Writer(path)
    else:
        path = Path(folder) / name
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        writer = Rosbag2Writer(path, version=9, storage_plugin=plugin)
    with writer:
        connections = {}
        for topic, msgtype, time_ns, fields in sorted(records, key=lambda r: r[2]):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=types)
            if 'raw' in fields:
                rawdata = fields['raw']
            else:
                msg = _message(types, msgtype, time_ns, fields, ros1)
                rawdata = (types.serialize_ros1(msg, msgtype) if ros1
                           else types.serialize_cdr(msg, msgtype))
            writer.write(connections[topic], time_ns, rawdata)
    return path


class Scene:
    """Synthetic recording: known frames on two cameras and an operator's narration."""

    def __init__(self, seed=0, start=T0, raw_frames=6, jpeg_frames=4):
        rng = np.random.default_rng(seed)
        self.records = []
        self.raw = {}
        self.jpeg = {}
        for index in range(raw_frames):
            time_ns = start + index * 100 * MS
            rgb = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
            encoding = ('rgb8', 'bgr8', 'mono8')[index % 3]
            if encoding == 'rgb8':
                data, step = rgb.tobytes(), 96
            elif encoding == 'bgr8':
                # Padded rows, as some drivers publish them.
                rows = rgb[..., ::-1].reshape(24, 96)
                data = np.concatenate([rows, np.full((24, 8), 7, np.uint8)], axis=1).tobytes()
                step = 104
            else:
                rgb = np.repeat(rgb[..., :1], 3, axis=2)
                data, step = rgb[..., 0].tobytes(), 32
            self.raw[time_ns] = rgb
            self.records.append(('/cam/raw', IMAGE, time_ns, {
                'encoding': encoding, 'width': 32, 'height': 24, 'step': step, 'data': data}))
        for index in range(jpeg_frames):
            time_ns = start + 50 * MS + index * 150 * MS
            picture = np.zeros((40, 48, 3), dtype=np.uint8)
            picture[:, :, index % 3] = 60 + 40 * index
            ok, jpeg = cv2.imencode('.jpg', picture)
            self.jpeg[time_ns] = jpeg.tobytes()
            self.records.append(('/cam/compressed', COMPRESSED, time_ns, {
                'format': 'rgb8; jpeg compressed bgr8', 'data': jpeg.tobytes()}))
        self.narration = [
            (start - 10 * MS, 'a red part on the belt'),
            (start + 220 * MS, 'the belt   is empty'),
            (start + 400 * MS, ''),
            (start + 480 * MS, 'two boxes on the conveyor'),
        ]
        for time_ns, text in self.narration:
            self.records.append(('/operator/caption', STRING, time_ns, {'data': text}))

    def caption_at(self, time_ns, max_age_ns):
        """Compute the expected caption the simple way: scan the narration."""
        earlier = [(t, text) for t, text in self.narration if t <= time_ns]
        if not earlier:
            return None
        caption_time, text = max(earlier)
        if time_ns - caption_time > max_age_ns or not text:
            return None
        return ' '.join(text.split())


def _run(args, capsys):
    code = bag_to_coco.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _by_frame(dataset):
    return {(image['topic'], image['timestamp_ns']): image for image in dataset['images']}


def _captions(dataset):
    result = {}
    for note in dataset['annotations']:
        result.setdefault(note['image_id'], []).append(note['caption'])
    return result


@pytest.mark.parametrize('storage', STORAGES)
def test_every_image_and_caption_matches_what_was_recorded(tmp_path, capsys, storage):
    scene = Scene()
    bag = write_bag(tmp_path, 'shift1', storage, scene.records)
    out = tmp_path / 'dataset'
    code, stdout, stderr = _run([
        bag, '--image-topic', '/cam/raw', '--image-topic', '/cam/compressed',
        '--caption-topic', '/operator/caption', '--caption-max-age', '0.25',
        '--image-format', 'png', '--out', out], capsys)
    assert code == 0, stderr

    dataset = read_annotations(out)
    frames = _by_frame(dataset)
    captions = _captions(dataset)
    expected_kept = 0
    for topic, pictures in (('/cam/raw', scene.raw), ('/cam/compressed', scene.jpeg)):
        for time_ns, picture in pictures.items():
            caption = scene.caption_at(time_ns, 250 * MS)
            if caption is None:
                assert (topic, time_ns) not in frames
                continue
            expected_kept += 1
            image = frames[(topic, time_ns)]
            path = out / 'images' / image['file_name']
            assert captions[image['id']] == [caption]
            assert image['bag'] == bag.name
            assert image['header_stamp_ns'] == time_ns
            assert image['frame_id'] == 'camera'
            if topic == '/cam/raw':
                assert path.suffix == '.png'
                assert (image['width'], image['height']) == (32, 24)
                np.testing.assert_array_equal(_rgb(path), picture)
            else:
                # JPEG frames are stored exactly as recorded, not decoded and re-encoded.
                assert path.suffix == '.jpg'
                assert path.read_bytes() == picture
                assert (image['width'], image['height']) == (48, 40)
    assert len(frames) == expected_kept > 0
    assert len(dataset['annotations']) == expected_kept
    assert all(note['source'] == 'caption_topic' and note['machine_generated'] is False
               for note in dataset['annotations'])
    assert len({note['id'] for note in dataset['annotations']}) == expected_kept
    skipped = len(scene.raw) + len(scene.jpeg) - expected_kept
    assert f'frames kept: {expected_kept}' in stdout
    assert f'no_caption: {skipped}' in stdout
    assert validate_dataset(out) == []
    assert not [p for p in tmp_path.iterdir() if '.partial' in p.name]


def test_a_topic_caption_older_than_caption_max_age_does_not_apply(tmp_path, capsys):
    scene = Scene()
    bag = write_bag(tmp_path, 'shift1', 'mcap', scene.records)
    out = tmp_path / 'dataset'
    code, stdout, stderr = _run([
        bag, '--image-topic', '/cam/raw', '--image-topic', '/cam/compressed',
        '--caption-topic', '/operator/caption', '--caption-max-age', '0.1', '--out', out],
        capsys)
    assert code == 0, stderr
    frames = _by_frame(read_annotations(out))
    expected = {}
    too_old = 0
    for topic, pictures in (('/cam/raw', scene.raw), ('/cam/compressed', scene.jpeg)):
        for time_ns in pictures:
            caption = scene.caption_at(time_ns, 100 * MS)
            if caption is not None:
                expected[(topic, time_ns)] = caption
            elif scene.caption_at(time_ns, 10**12) is not None:
                too_old += 1  # a caption was said, but more than 0.1 s before the frame
    assert too_old >= 3
    captions = _captions(read_annotations(out))
    assert {key: captions[image['id']] for key, image in frames.items()} == {
        key: [caption] for key, caption in expected.items()}
    skipped = len(scene.raw) + len(scene.jpeg) - len(expected)
    assert f'no_caption: {skipped}' in stdout


def test_same_command_twice_gives_identical_output(tmp_path, capsys):
    bag = write_bag(tmp_path, 'run', 'sqlite3', Scene(seed=3).records)
    outputs = []
    for name in ('first', 'second'):
        out = tmp_path / name
        code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--image-topic',
                                '/cam/compressed', '--out', out], capsys)
        assert code == 0, stderr
        outputs.append(out)
    first, second = outputs
    assert (first / 'annotations.json').read_bytes() == (second / 'annotations.json').read_bytes()
    names = sorted(p.name for p in (first / 'images').iterdir())
    assert names == sorted(p.name for p in (second / 'images').iterdir())
    assert len(names) == 10
    for name in names:
        assert (first / 'images' / name).read_bytes() == (second / 'images' / name).read_bytes()

    # Running it again on the same folder finds every frame there already and changes nothing.
    before = (first / 'annotations.json').read_bytes()
    code, stdout, _ = _run([bag, '--image-topic', '/cam/raw', '--image-topic',
                            '/cam/compressed', '--out', first], capsys)
    assert code == 0
    assert 'already_in_dataset: 10' in stdout
    assert (first / 'annotations.json').read_bytes() == before


def test_two_bags_of_different_formats_merge_into_one_dataset(tmp_path, capsys):
    morning = Scene(seed=1, start=T0)
    evening = Scene(seed=2, start=T0 + 3600 * 1000 * MS)
    bag_a = write_bag(tmp_path, 'morning', 'mcap', morning.records)
    bag_b = write_bag(tmp_path, 'evening', 'ros1', evening.records)
    out = tmp_path / 'merged'
    code, _, stderr = _run([bag_a, bag_b, '--image-topic', '/cam/raw', '--image-format', 'png',
                            '--out', out], capsys)
    assert code == 0, stderr
    dataset = read_annotations(out)
    assert [image['id'] for image in dataset['images']] == list(range(1, 13))
    assert [image['bag'] for image in dataset['images']] == ['morning'] * 6 + ['evening.bag'] * 6
    for image in dataset['images']:
        scene = morning if image['bag'] == 'morning' else evening
        expected = scene.raw[image['timestamp_ns']]
        np.testing.assert_array_equal(_rgb(out / 'images' / image['file_name']), expected)
    assert dataset['annotations'] == []


def _two_days(tmp_path, second_storage):
    """Write the bags of two days; return them, the dataset folder and the converter options."""
    first_bag = write_bag(tmp_path, 'day1', 'sqlite3', Scene(seed=4).records)
    second_bag = write_bag(tmp_path, 'day2', second_storage,
                           Scene(seed=5, start=T0 + 10**12).records)
    out = tmp_path / 'dataset'
    args = ['--image-topic', '/cam/raw', '--caption-topic', '/operator/caption',
            '--caption-max-age', '0.25', '--out', out]
    return first_bag, second_bag, out, args


def test_appending_a_bag_later_keeps_every_existing_id(tmp_path, capsys):
    first_bag, second_bag, out, args = _two_days(tmp_path, 'ros1')
    assert _run([first_bag, *args], capsys)[0] == 0
    before = read_annotations(out)
    files_before = {p.name: p.read_bytes() for p in (out / 'images').iterdir()}
    code, stdout, stderr = _run([second_bag, *args], capsys)
    assert code == 0, stderr
    after = read_annotations(out)

    count = len(before['images'])
    assert after['images'][:count] == before['images']
    assert after['annotations'][:len(before['annotations'])] == before['annotations']
    new_images = after['images'][count:]
    assert [image['id'] for image in new_images] == list(range(count + 1, count + 1 +
                                                               len(new_images)))
    assert new_images and all(image['bag'] == 'day2.bag' for image in new_images)
    new_notes = after['annotations'][len(before['annotations']):]
    assert min(note['id'] for note in new_notes) > max(n['id'] for n in before['annotations'])
    assert {note['image_id'] for note in new_notes} == {image['id'] for image in new_images}
    for name, payload in files_before.items():
        assert (out / 'images' / name).read_bytes() == payload
    assert validate_dataset(out) == []


def test_appending_after_frames_were_deleted_by_hand_gives_unused_ids(tmp_path, capsys):
    first_bag, second_bag, out, args = _two_days(tmp_path, 'mcap')
    assert _run([first_bag, *args], capsys)[0] == 0
    # A user drops a bad frame, as the README says: its entry, its captions and its file.
    path = out / 'annotations.json'
    data = json.loads(path.read_text())
    dropped = data['images'].pop(0)
    data['annotations'] = [note for note in data['annotations']
                           if note['image_id'] != dropped['id']]
    path.write_text(json.dumps(data))
    (out / 'images' / dropped['file_name']).unlink()
    assert validate_dataset(out) == []
    old_image_ids = {image['id'] for image in data['images']}
    old_note_ids = {note['id'] for note in data['annotations']}

    code, _, stderr = _run([second_bag, *args], capsys)
    assert code == 0, stderr
    after = read_annotations(out)
    new_images = [image for image in after['images'] if image['bag'] == 'day2']
    new_notes = after['annotations'][len(old_note_ids):]
    assert new_images and new_notes
    assert min(image['id'] for image in new_images) > max(old_image_ids)
    assert min(note['id'] for note in new_notes) > max(old_note_ids)
    assert validate_dataset(out) == []


def test_a_failed_write_of_annotations_json_leaves_the_old_one(tmp_path, capsys):
    """A disk that fills up while the appended dataset is written keeps the old, whole file."""
    first_bag = write_bag(tmp_path, 'day1', 'sqlite3',
                          Scene(seed=4, raw_frames=40, jpeg_frames=0).records)
    second_bag = write_bag(tmp_path, 'day2', 'mcap',
                           Scene(seed=5, start=T0 + 10**12, raw_frames=40, jpeg_frames=0).records)
    out = tmp_path / 'dataset'
    assert _run([first_bag, '--image-topic', '/cam/raw', '--out', out], capsys)[0] == 0
    before = (out / 'annotations.json').read_bytes()
    images_before = sorted(path.name for path in (out / 'images').iterdir())
    largest_image = max(p.stat().st_size for p in (out / 'images').iterdir())
    # Files may grow to 1.5 times the old annotations.json: every frame fits, the new
    # annotations.json (twice the frames) does not.
    limit = len(before) * 3 // 2
    assert largest_image < limit

    def limit_file_size():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    completed = subprocess.run(
        [sys.executable, '-m', 'training.bag_to_coco', str(second_bag), '--image-topic',
         '/cam/raw', '--quiet', '--out', str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE='1'))
    assert completed.returncode == 1, completed.stderr[-2000:]
    assert completed.stderr.startswith('bag_to_coco: error: [Errno 27] File too large')
    assert completed.stderr.endswith(f'the dataset folder {out} was left as it was\n')
    assert completed.stderr.count('\n') == 1
    assert (out / 'annotations.json').read_bytes() == before
    # The new frames went back out of images/ with the rest of the unfinished append.
    assert sorted(path.name for path in (out / 'images').iterdir()) == images_before
    assert validate_dataset(out) == []
    assert not [p for p in tmp_path.iterdir() if '.partial' in p.name]
    assert not [p for p in out.iterdir() if p.name.startswith('.annotations.json.')]


def _wait_for_text(process, log, text, timeout=120):
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None, f'the run ended without waiting: {log.read_text()}'
        assert time.monotonic() < deadline, f'no {text!r} after {timeout} s'
        time.sleep(0.05)


def test_runs_appending_to_the_same_folder_take_turns(tmp_path, capsys):
    bags = [write_bag(tmp_path, f'cam{index}', storage,
                      [r for r in Scene(seed=20 + index, start=T0 + index * 10**12).records
                       if r[0] == '/cam/raw'])
            for index, storage in enumerate(('sqlite3', 'mcap', 'ros1'))]
    out = tmp_path / 'dataset'
    assert _run([bags[0], '--image-topic', '/cam/raw', '--out', out], capsys)[0] == 0
    before = (out / 'annotations.json').read_bytes()

    # While the test holds the lock, both runs have to wait: they overlap for certain, and
    # without the lock both would read the same annotations.json and the last commit would win.
    runs = []
    with dataset_lock(out):
        for bag in bags[1:]:
            log = tmp_path / f'{bag.name}.log'
            with open(log, 'w') as stderr:
                process = subprocess.Popen(
                    [sys.executable, '-m', 'training.bag_to_coco', str(bag), '--image-topic',
                     '/cam/raw', '--quiet', '--out', str(out)],
                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
            runs.append((process, log))
        for process, log in runs:
            _wait_for_text(process, log, f'waiting for another bag_to_coco run on {out}')
        assert (out / 'annotations.json').read_bytes() == before
        assert all(process.poll() is None for process, _ in runs)
    for process, log in runs:
        assert process.wait(timeout=120) == 0, log.read_text()
        assert log.read_text() == f'bag_to_coco: waiting for another bag_to_coco run on {out}\n'

    dataset = read_annotations(out)
    images = dataset['images']
    assert sorted(image['id'] for image in images) == list(range(1, 19))
    assert sorted(image['bag'] for image in images) == sorted(
        ['cam0'] * 6 + ['cam1'] * 6 + ['cam2.bag'] * 6)
    assert {image['file_name'] for image in images} == {p.name for p in (out / 'images').iterdir()}
    assert validate_dataset(out) == []
    assert not [p for p in tmp_path.iterdir() if '.partial' in p.name]


def _kept_times(out):
    return [image['timestamp_ns'] for image in read_annotations(out)['images']]


def test_every_n_min_interval_and_max_frames_select_the_right_frames(tmp_path, capsys):
    scene = Scene(seed=6, raw_frames=10, jpeg_frames=0)
    bag = write_bag(tmp_path, 'select', 'mcap', scene.records)
    times = sorted(scene.raw)

    code, stdout, _ = _run([bag, '--image-topic', '/cam/raw', '--every-n', '3',
                            '--out', tmp_path / 'every_n'], capsys)
    assert code == 0 and 'every_n: 6' in stdout
    assert _kept_times(tmp_path / 'every_n') == [times[0], times[3], times[6], times[9]]

    # 100 ms apart, at least 250 ms between kept frames: 0, 300, 600, 900 ms.
    code, stdout, _ = _run([bag, '--image-topic', '/cam/raw', '--min-interval', '0.25',
                            '--out', tmp_path / 'interval'], capsys)
    assert code == 0 and 'min_interval: 6' in stdout
    assert _kept_times(tmp_path / 'interval') == [times[0], times[3], times[6], times[9]]

    code, stdout, _ = _run([bag, '--image-topic', '/cam/raw', '--max-frames', '4',
                            '--out', tmp_path / 'max'], capsys)
    assert code == 0 and 'stopped early' in stdout
    assert _kept_times(tmp_path / 'max') == times[:4]


def test_dedup_drops_near_identical_frames_of_a_still_scene(tmp_path):
    rng = np.random.default_rng(7)
    still = rng.integers(40, 200, size=(48, 64, 3), dtype=np.uint8)
    moved = np.roll(still, 20, axis=1)
    frames = [still]
    for _ in range(5):
        # Sensor noise of a couple of grey levels on a conveyor that does not move.
        noise = rng.integers(-3, 4, size=still.shape)
        frames.append(np.clip(still.astype(int) + noise, 0, 255).astype(np.uint8))
    frames += [moved, moved, still]
    records = [('/cam/raw', IMAGE, T0 + index * 100 * MS, {
        'encoding': 'rgb8', 'width': 64, 'height': 48, 'step': 192, 'data': frame.tobytes()})
        for index, frame in enumerate(frames)]
    bag = write_bag(tmp_path, 'still', 'sqlite3', records)

    options = bag_to_coco.ConversionOptions(
        image_topics=['/cam/raw'], out=str(tmp_path / 'dedup'), dedup=True)
    summary = bag_to_coco.convert_bags([bag], options)
    assert summary.skipped == {'duplicate': 6}
    assert _kept_times(tmp_path / 'dedup') == [T0, T0 + 600 * MS, T0 + 800 * MS]

    options = bag_to_coco.ConversionOptions(image_topics=['/cam/raw'],
                                            out=str(tmp_path / 'all'))
    assert bag_to_coco.convert_bags([bag], options).frames_kept == len(frames)


def _ranges_bag(tmp_path):
    """Write a ROS 1 bag of raw frames; return it, their times and the times as seconds."""
    scene = Scene(seed=8, jpeg_frames=0)
    bag = write_bag(tmp_path, 'ranges', 'ros1', scene.records)
    times = sorted(scene.raw)
    return bag, times, [f'{t // 10**9}.{t % 10**9:09d}' for t in times]


@pytest.mark.parametrize('suffix', ['.csv', '.jsonl'])
def test_captions_file_time_ranges(tmp_path, capsys, suffix):
    bag, times, seconds = _ranges_bag(tmp_path)
    ranges = [(seconds[0], seconds[1], 'a worker, at the belt'),
              (seconds[1], seconds[2], 'an empty conveyor'),
              (seconds[4], seconds[4], 'one red box')]
    sidecar = tmp_path / f'labels{suffix}'
    if suffix == '.csv':
        lines = ['start,end,caption', '# the first shift']
        lines += [f'{start},{end},"{caption}"' for start, end, caption in ranges]
    else:
        # JSON numbers are read through their shortest decimal form, so 1700000000.1 is
        # exact; strings carry full nanoseconds.
        lines = [json.dumps({'start': float(start), 'end': float(end), 'caption': caption})
                 for start, end, caption in ranges[:2]]
        lines.append(json.dumps({'start': seconds[4], 'end': seconds[4], 'caption': ranges[2][2]}))
        lines.insert(1, '')
    sidecar.write_text('\n'.join(lines) + '\n')

    out = tmp_path / 'dataset'
    code, stdout, stderr = _run([bag, '--image-topic', '/cam/raw', '--captions-file', sidecar,
                                 '--keep-uncaptioned', '--out', out], capsys)
    assert code == 0, stderr
    dataset = read_annotations(out)
    captions = _captions(dataset)
    by_time = {image['timestamp_ns']: captions.get(image['id'], [])
               for image in dataset['images']}
    assert by_time == {
        times[0]: ['a worker, at the belt'],
        times[1]: ['a worker, at the belt', 'an empty conveyor'],
        times[2]: ['an empty conveyor'],
        times[3]: [],
        times[4]: ['one red box'],
        times[5]: [],
    }
    assert 'kept images without a caption: 2' in stdout
    assert all(note['source'] == 'captions_file' for note in dataset['annotations'])


def test_captions_file_rows_in_any_order_give_the_same_captions(tmp_path, capsys):
    bag, times, seconds = _ranges_bag(tmp_path)
    # Written by hand, newest first: the file is not sorted by time.
    rows = [(seconds[4], seconds[5], 'one red box'),
            (seconds[2], seconds[3], 'an empty conveyor'),
            (seconds[0], seconds[1], 'a worker at the belt')]
    sidecar = tmp_path / 'labels.csv'
    sidecar.write_text(''.join(f'{start},{end},{caption}\n' for start, end, caption in rows))
    out = tmp_path / 'dataset'
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--captions-file', sidecar,
                            '--out', out], capsys)
    assert code == 0, stderr
    dataset = read_annotations(out)
    captions = _captions(dataset)
    assert {image['timestamp_ns']: captions[image['id']] for image in dataset['images']} == {
        times[0]: ['a worker at the belt'], times[1]: ['a worker at the belt'],
        times[2]: ['an empty conveyor'], times[3]: ['an empty conveyor'],
        times[4]: ['one red box'], times[5]: ['one red box']}


@pytest.mark.parametrize('content, suffix, expected', [
    ('start,end,caption\n10,5,backwards\n', '.csv', 'line 2: end 5 is before start 10'),
    ('1,2,   \n', '.csv', 'line 1: the caption is empty'),
    ('abc,2,x\n', '.csv', "line 1: 'abc' is not a time in seconds"),
    ('1,2\n', '.csv', 'line 1: expected start,end,caption'),
    ('{"start": 1}\n', '.jsonl', 'line 1: expected a JSON object'),
    ('\n', '.csv', 'no caption ranges'),
    ('1,2,x\n', '.txt', 'must end in .csv or .jsonl'),
])
def test_bad_captions_files_are_rejected_with_the_line(tmp_path, capsys, content, suffix,
                                                       expected):
    bag = write_bag(tmp_path, 'b', 'sqlite3', Scene(jpeg_frames=0).records)
    sidecar = tmp_path / f'labels{suffix}'
    sidecar.write_text(content)
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--captions-file', sidecar,
                            '--out', tmp_path / 'out'], capsys)
    assert code == 1
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_auto_caption_labels_frames_through_the_captioner(tmp_path, capsys,
                                                          tiny_opt_checkpoint):
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
    scene = Scene(seed=9, jpeg_frames=0)
    bag = write_bag(tmp_path, 'auto', 'mcap', scene.records)
    out = tmp_path / 'dataset'
    code, stdout, stderr = _run([
        bag, '--image-topic', '/cam/raw', '--auto-caption', tiny_opt_checkpoint,
        '--auto-caption-prompt', 'a photo of', '--auto-caption-batch-size', '4',
        '--max-new-tokens', '6', '--device', 'cpu', '--image-format', 'png', '--out', out],
        capsys)
    assert code == 0, stderr
    dataset = read_annotations(out)
    assert len(dataset['images']) == 6

    # The random tiny model stops at once without a prompt; with one it says something.
    captioner = Blip2Captioner(CaptionerConfig(model=str(tiny_opt_checkpoint), device='cpu',
                                               max_new_tokens=6))
    expected = captioner.caption([scene.raw[image['timestamp_ns']]
                                  for image in dataset['images']], prompt='a photo of')
    assert all(caption.strip() for caption in expected)
    captions = _captions(dataset)
    for image, caption in zip(dataset['images'], expected):
        assert captions[image['id']] == [' '.join(caption.split())]
    assert len(dataset['annotations']) == 6
    for note in dataset['annotations']:
        assert note['machine_generated'] is True
        assert note['source'] == 'auto_caption'
        assert note['model'] == str(tiny_opt_checkpoint)
    assert 'from auto_caption: 6' in stdout


def test_auto_caption_uses_the_prompt_the_model_was_trained_with(tmp_path, capsys,
                                                                 tiny_opt_checkpoint):
    from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, TRAINING_INFO_FILE
    model = tmp_path / 'trained'
    shutil.copytree(tiny_opt_checkpoint, model)
    (model / TRAINING_INFO_FILE).write_text(json.dumps({'prompt': 'a photo of'}))
    scene = Scene(seed=9, jpeg_frames=0)
    bag = write_bag(tmp_path, 'auto', 'mcap', scene.records)
    common = [bag, '--image-topic', '/cam/raw', '--auto-caption', model, '--max-new-tokens',
              '6', '--device', 'cpu', '--image-format', 'png', '--keep-uncaptioned']
    code, _, stderr = _run([*common, '--out', tmp_path / 'trained_prompt'], capsys)
    assert code == 0, stderr
    dataset = read_annotations(tmp_path / 'trained_prompt')
    # The random tiny model stops at once without a prompt; with this one it says something.
    captioner = Blip2Captioner(CaptionerConfig(model=str(model), device='cpu', max_new_tokens=6))
    frames = [scene.raw[image['timestamp_ns']] for image in dataset['images']]
    expected = captioner.caption(frames, prompt='a photo of')
    assert all(expected) and not any(captioner.caption(frames, prompt=''))
    captions = _captions(dataset)
    assert [captions[image['id']] for image in dataset['images']] == [
        [' '.join(caption.split())] for caption in expected]
    # An explicit prompt, even none, wins.
    code, _, stderr = _run([*common, '--auto-caption-prompt', '', '--out', tmp_path / 'none'],
                           capsys)
    assert code == 0, stderr
    assert not read_annotations(tmp_path / 'none')['annotations']


def test_auto_caption_with_a_missing_model_fails_cleanly(tmp_path, capsys):
    bag = write_bag(tmp_path, 'auto', 'sqlite3', Scene(jpeg_frames=0).records)
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--auto-caption',
                            tmp_path / 'no-such-model', '--out', tmp_path / 'out'], capsys)
    assert code == 1
    assert stderr.startswith('bag_to_coco: error: --auto-caption:')
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_auto_caption_with_code_of_its_own_needs_trust_remote_code(
        tmp_path, capsys, tiny_opt_checkpoint, code_of_its_own):
    bag = write_bag(tmp_path, 'auto', 'mcap', Scene(seed=9, jpeg_frames=0).records)
    model = code_of_its_own(tiny_opt_checkpoint)
    common = [bag, '--image-topic', '/cam/raw', '--auto-caption', model,
              '--auto-caption-prompt', 'a photo of', '--max-new-tokens', '6', '--device', 'cpu',
              '--image-format', 'png']
    code, _, stderr = _run([*common, '--out', tmp_path / 'refused'], capsys)
    assert code == 1 and '--trust-remote-code' in stderr and str(model) in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / 'refused').exists()
    code, _, stderr = _run([*common, '--trust-remote-code', '--out', tmp_path / 'out'], capsys)
    assert code == 0, stderr
    assert len(read_annotations(tmp_path / 'out')['annotations']) == 6


def test_bad_frames_inside_a_good_bag_are_skipped_and_counted(tmp_path, capsys):
    good = np.full((8, 8, 3), 100, np.uint8)
    ok, jpeg = cv2.imencode('.jpg', good)
    records = [
        ('/cam', IMAGE, T0, {'encoding': 'rgb8', 'width': 8, 'height': 8, 'step': 24,
                             'data': good.tobytes()}),
        ('/cam', IMAGE, T0 + 1 * MS, {'encoding': 'rgb8', 'width': 8, 'height': 8,
                                      'step': 24, 'data': good.tobytes()[:100]}),
        ('/cam', IMAGE, T0 + 2 * MS, {'encoding': 'hsv8', 'width': 8, 'height': 8,
                                      'step': 24, 'data': good.tobytes()}),
        ('/cam', IMAGE, T0 + 3 * MS, {'encoding': 'rgb8', 'width': 8, 'height': 8,
                                      'step': 20, 'data': bytes(160)}),
        ('/cam', IMAGE, T0 + 4 * MS, {'encoding': 'rgb8', 'width': 0, 'height': 0,
                                      'step': 0, 'data': b''}),
        ('/cam', IMAGE, T0 + 5 * MS, {'encoding': 'rgb8', 'width': 100, 'height': 100,
                                      'step': 300, 'data': bytes(30000)}),
        ('/jpeg', COMPRESSED, T0 + 6 * MS, {'format': 'jpeg', 'data': jpeg.tobytes()[:40]}),
        ('/jpeg', COMPRESSED, T0 + 7 * MS, {'format': 'jpeg', 'data': jpeg.tobytes()}),
    ]
    bag = write_bag(tmp_path, 'bad_frames', 'sqlite3', records)
    out = tmp_path / 'out'
    code, stdout, stderr = _run([bag, '--image-topic', '/cam', '--image-topic', '/jpeg',
                                 '--max-pixels', '5000', '--out', out], capsys)
    assert code == 0, stderr
    assert 'frames read: 8' in stdout and 'frames kept: 2' in stdout
    for reason in ('bad_size', 'unknown_encoding', 'bad_step', 'empty', 'too_large',
                   'undecodable'):
        assert f'  {reason}: 1' in stdout
    assert sorted(_kept_times(out)) == [T0, T0 + 7 * MS]


def _assert_clean_failure(code, stderr, tmp_path, out, expected):
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith('bag_to_coco: error: ')]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert 'Traceback' not in stderr
    assert expected in stderr, stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if '.partial' in p.name]


def _truncate(path, fraction=0.6):
    payload = path.read_bytes()
    path.write_bytes(payload[:int(len(payload) * fraction)])
    return path


def _make_bad_bag(tmp_path, kind):
    records = Scene(seed=10).records
    if kind == 'missing':
        return tmp_path / 'nothing_here.bag', 'no such bag file or folder'
    if kind == 'empty_file':
        path = tmp_path / 'empty.bag'
        path.write_bytes(b'')
        return path, 'file is empty'
    if kind == 'not_a_bag':
        path = tmp_path / 'notes.bag'
        path.write_text('these are not the frames you are looking for\n')
        return path, 'not a ROS bag'
    if kind == 'truncated_ros1':
        return _truncate(write_bag(tmp_path, 'cut', 'ros1', records)), 'cannot open ROS 1 bag'
    if kind == 'unindexed_ros1':
        path = write_bag(tmp_path, 'unindexed', 'ros1', records)
        payload = bytearray(path.read_bytes())
        where = payload.find(b'index_pos=') + len(b'index_pos=')
        payload[where:where + 8] = bytes(8)
        path.write_bytes(bytes(payload))
        return path, 'rosbag reindex'
    if kind == 'truncated_db3':
        folder = write_bag(tmp_path, 'cut_db3', 'sqlite3', records)
        return _truncate(folder / 'cut_db3.db3'), 'cannot open rosbag2 sqlite3 file'
    if kind == 'truncated_mcap':
        folder = write_bag(tmp_path, 'cut_mcap', 'mcap', records)
        return _truncate(folder / 'cut_mcap.mcap'), 'the file is truncated'
    if kind == 'missing_metadata':
        folder = write_bag(tmp_path, 'no_meta', 'sqlite3', records)
        (folder / 'metadata.yaml').unlink()
        return folder, 'has no metadata.yaml'
    if kind == 'broken_metadata':
        folder = write_bag(tmp_path, 'bad_meta', 'mcap', records)
        (folder / 'metadata.yaml').write_text('rosbag2_bagfile_information: {version: 5}\n')
        return folder, 'cannot open rosbag2 folder'
    if kind == 'undeserializable':
        records = records + [('/cam/raw', IMAGE, T0 + 5 * MS, {'raw': b'\x00\x01\x00\x00\xff'})]
        return (write_bag(tmp_path, 'garbled', 'sqlite3', records),
                f'message on /cam/raw at {T0 + 5 * MS} ns cannot be deserialized')
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', [
    'missing', 'empty_file', 'not_a_bag', 'truncated_ros1', 'unindexed_ros1', 'truncated_db3',
    'truncated_mcap', 'missing_metadata', 'broken_metadata', 'undeserializable',
])
def test_bad_bags_fail_with_one_line_and_write_nothing(tmp_path, capsys, kind):
    good = write_bag(tmp_path, 'good', 'mcap', Scene(seed=11).records)
    bad, expected = _make_bad_bag(tmp_path, kind)
    out = tmp_path / 'out'
    # The good bag comes first, so a half-written dataset would show if atomicity broke.
    code, stdout, stderr = _run([good, bad, '--image-topic', '/cam/raw', '--out', out], capsys)
    _assert_clean_failure(code, stderr, tmp_path, out, expected)
    assert str(bad) in stderr
    assert stdout == ''


def test_bad_bag_does_not_touch_an_existing_dataset(tmp_path, capsys):
    scene = Scene(seed=12)
    good = write_bag(tmp_path, 'good', 'sqlite3', scene.records)
    out = tmp_path / 'dataset'
    assert _run([good, '--image-topic', '/cam/raw', '--out', out], capsys)[0] == 0
    before = (out / 'annotations.json').read_bytes()
    names = sorted(p.name for p in (out / 'images').iterdir())
    later = Scene(seed=13, start=T0 + 10**12).records + [
        ('/cam/raw', IMAGE, T0 + 10**12 + 999 * MS, {'raw': b'\x00\x01\x00\x00'})]
    damaged = write_bag(tmp_path, 'damaged', 'mcap', later)
    code, _, stderr = _run([damaged, '--image-topic', '/cam/raw', '--out', out], capsys)
    assert code == 1 and 'cannot be deserialized' in stderr
    assert (out / 'annotations.json').read_bytes() == before
    assert sorted(p.name for p in (out / 'images').iterdir()) == names
    assert not [p for p in tmp_path.iterdir() if '.partial' in p.name]


def _edit_metadata(folder, old, new):
    metadata = folder / 'metadata.yaml'
    text = metadata.read_text()
    assert old in text
    metadata.write_text(text.replace(old, new))


@pytest.mark.parametrize('storage, old, new, args', [
    ('sqlite3', 'name: /cam/raw', 'name: /camera', ['--image-topic', '/camera']),
    # One topic of two: the frames of the other must not hide the empty one.
    ('mcap', 'type: sensor_msgs/msg/CompressedImage', 'type: sensor_msgs/msg/Image',
     ['--image-topic', '/cam/raw', '--image-topic', '/cam/compressed']),
    ('sqlite3', 'name: /operator/caption', 'name: /narration',
     ['--image-topic', '/cam/raw', '--caption-topic', '/narration']),
])
def test_metadata_that_disagrees_with_the_storage_file_is_rejected(
        tmp_path, capsys, storage, old, new, args):
    good = write_bag(tmp_path, 'good', 'ros1', Scene(seed=17).records)
    edited = write_bag(tmp_path, 'edited', storage, Scene(seed=18, start=T0 + 10**12).records)
    _edit_metadata(edited, old, new)
    out = tmp_path / 'out'
    code, stdout, stderr = _run([good, edited, *args, '--out', out], capsys)
    _assert_clean_failure(code, stderr, tmp_path, out,
                          f'{edited}: metadata.yaml and the storage file disagree')
    suffix = 'mcap' if storage == 'mcap' else 'db3'
    assert f'pass {edited / f"edited.{suffix}"} to read it without metadata.yaml' in stderr
    assert stdout == ''


@pytest.mark.parametrize('args, expected', [
    (['--image-topic', '/nope'], "image topic '/nope' is not in"),
    (['--image-topic', '/operator/caption'], "topic '/operator/caption' is std_msgs/msg/String"),
    (['--image-topic', '/cam/raw', '--caption-topic', '/narration'],
     "caption topic '/narration' is not in"),
    (['--image-topic', '/cam/raw', '--caption-topic', '/cam/compressed'],
     "topic '/cam/compressed' is sensor_msgs/msg/CompressedImage, not std_msgs/msg/String"),
    (['--image-topic', '/cam/raw', '--every-n', '0'], '--every-n must be 1 or more'),
    (['--image-topic', '/cam/raw', '--caption-topic', '/operator/caption', '--captions-file',
      'x.csv'], 'choose one caption source'),
])
def test_wrong_topics_and_options_are_named(tmp_path, capsys, args, expected):
    bag = write_bag(tmp_path, 'topics', 'ros1', Scene(seed=14).records)
    out = tmp_path / 'out'
    code, _, stderr = _run([bag, *args, '--out', out], capsys)
    _assert_clean_failure(code, stderr, tmp_path, out, expected)
    if 'is not in' in expected and 'image' in expected:
        assert 'its image topics are: /cam/compressed, /cam/raw' in stderr


def test_out_folder_that_is_not_a_dataset_is_refused(tmp_path, capsys):
    bag = write_bag(tmp_path, 'b', 'sqlite3', Scene(seed=15).records)
    out = tmp_path / 'holiday_photos'
    out.mkdir()
    (out / 'beach.jpg').write_bytes(b'...')
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--out', out], capsys)
    assert code == 1 and 'is not empty and holds no annotations.json' in stderr
    assert sorted(p.name for p in out.iterdir()) == ['beach.jpg']


def test_a_mount_point_as_out_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    # The new dataset is made beside --out and renamed into it, which cannot cross from one
    # filesystem to another (a container's volume as --out); '/' is a mount point everywhere.
    bag = write_bag(tmp_path, 'b', 'sqlite3', Scene(seed=15).records)
    before = sorted(os.listdir('/'))
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--out', '/'], capsys)
    assert code == 1
    assert stderr.strip() == ('bag_to_coco: error: --out / is a mount point; give a folder '
                              'inside it, e.g. /dataset')
    assert sorted(os.listdir('/')) == before


def test_dot_as_bag_and_as_out_folder(tmp_path, capsys, monkeypatch):
    bag = write_bag(tmp_path, 'shift', 'sqlite3', Scene(seed=19, jpeg_frames=0).records)
    monkeypatch.chdir(bag)
    code, _, stderr = _run(['.', '--image-topic', '/cam/raw', '--out', tmp_path / 'a'], capsys)
    assert code == 0, stderr
    images = read_annotations(tmp_path / 'a')['images']
    assert len(images) == 6
    assert all(image['bag'] == 'shift' and image['file_name'].startswith('shift__cam_raw__')
               for image in images)

    # From inside an empty folder: the dataset lands in it, and it stays the same folder
    # (the shell's working directory), so relative paths still see the files.
    dataset = tmp_path / 'b'
    dataset.mkdir()
    monkeypatch.chdir(dataset)
    folder = os.stat('.')
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--out', '.'], capsys)
    assert code == 0, stderr
    assert os.path.samestat(os.stat('.'), folder)
    assert sorted(os.listdir('.')) == ['annotations.json', 'images']
    assert read_annotations(Path('.'))['images'] == images
    later = write_bag(tmp_path, 'later', 'mcap', Scene(seed=20, start=T0 + 10**12).records)
    code, _, stderr = _run([later, '--image-topic', '/cam/raw', '--out', '.'], capsys)
    assert code == 0, stderr
    assert sorted(os.listdir('.')) == ['annotations.json', 'images']
    appended = read_annotations(Path('.'))['images']
    assert [image['id'] for image in appended] == list(range(1, 13))
    assert validate_dataset(Path('.')) == []


def test_progress_is_reported_on_stderr_and_throttled(tmp_path, capsys):
    bag = write_bag(tmp_path, 'long', 'sqlite3', Scene(seed=16, raw_frames=9).records)
    code, stdout, stderr = _run([bag, '--image-topic', '/cam/raw', '--progress-every', '0',
                                 '--out', tmp_path / 'o'], capsys)
    assert code == 0
    lines = stderr.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith('bag_to_coco: [1/1] long: 1/9 frames read, 0 kept in total')
    assert lines[-1].startswith('bag_to_coco: [1/1] long: 9/9 frames read, 9 kept in total')
    assert '[1/1]' not in stdout

    lines = []
    options = bag_to_coco.ConversionOptions(image_topics=['/cam/raw'], out=str(tmp_path / 'o2'))
    bag_to_coco.convert_bags([bag], options, progress=lines.append, progress_interval=3600)
    assert lines == []
    code, _, stderr = _run([bag, '--image-topic', '/cam/raw', '--progress-every', '0',
                            '--quiet', '--out', tmp_path / 'o3'], capsys)
    assert code == 0 and stderr == ''


def test_real_ros1_spot_bags(realdata, tmp_path, capsys):
    spot = realdata / 'ros1' / 'ctu_image_transport_codecs'
    out = tmp_path / 'spot'
    code, stdout, stderr = _run([
        spot / 'raw' / 'raw.bag', spot / 'compressed' / 'compressed.bag',
        spot / 'compressedDepth' / 'compressedDepth.bag',
        '--image-topic', '/spot/camera/hand_color/image',
        '--image-topic', '/spot/camera/hand_color/image/compressed',
        '--image-topic', '/spot/camera/frontleft/image',
        '--image-topic', '/spot/depth/frontleft/image',
        '--image-topic', '/spot/depth/frontleft/image/compressedDepth',
        '--image-format', 'png', '--out', out], capsys)
    assert code == 0, stderr
    frames = {image['topic']: image for image in read_annotations(out)['images']}
    assert len(frames) == 5
    sizes = {topic: (image['width'], image['height']) for topic, image in frames.items()}
    assert sizes['/spot/depth/frontleft/image'] == (424, 240)
    assert sizes['/spot/camera/hand_color/image'] == (640, 480)
    raw_colour = _rgb(out / 'images' / frames['/spot/camera/hand_color/image']['file_name'])
    jpeg_colour = _rgb(out / 'images' /
                       frames['/spot/camera/hand_color/image/compressed']['file_name'])
    assert np.abs(raw_colour.astype(int) - jpeg_colour.astype(int)).mean() < 8
    raw_depth = _rgb(out / 'images' / frames['/spot/depth/frontleft/image']['file_name'])
    packed_depth = _rgb(out / 'images' /
                        frames['/spot/depth/frontleft/image/compressedDepth']['file_name'])
    np.testing.assert_array_equal(raw_depth, packed_depth)
    assert validate_dataset(out) == []


def test_real_ros2_bag_in_a_folder_named_dot_bag(realdata, tmp_path, capsys):
    bag = realdata / 'ros2' / 'ait_ros2bag_tools' / 'images.bag'
    out = tmp_path / 'ait'
    code, stdout, stderr = _run([bag, '--image-topic', '/image', '--image-format', 'png',
                                 '--out', out], capsys)
    assert code == 0, stderr
    images = read_annotations(out)['images']
    assert [image['timestamp_ns'] for image in images] == [0, 1_000_000_000, 2_000_000_000]
    for image in images:
        np.testing.assert_array_equal(_rgb(out / 'images' / image['file_name'])[..., 0],
                                      [[0, 128], [128, 255]])
    # The three recorded frames are identical: dedup keeps one.
    code, stdout, _ = _run([bag, '--image-topic', '/image', '--dedup', '--out',
                            tmp_path / 'dedup'], capsys)
    assert code == 0 and 'duplicate: 2' in stdout


@pytest.mark.parametrize('old, new, topic', [
    ('name: /image', 'name: /camera', '/camera'),
    ('type: sensor_msgs/msg/Image', 'type: sensor_msgs/msg/CompressedImage', '/image'),
])
def test_real_bag_with_edited_metadata_is_rejected(realdata, tmp_path, capsys, old, new, topic):
    bag = tmp_path / 'images.bag'
    shutil.copytree(realdata / 'ros2' / 'ait_ros2bag_tools' / 'images.bag', bag)
    _edit_metadata(bag, old, new)
    out = tmp_path / 'out'
    code, _, stderr = _run([bag, '--image-topic', topic, '--out', out], capsys)
    _assert_clean_failure(code, stderr, tmp_path, out,
                          f'metadata.yaml lists 3 messages on {topic}')
    assert f'pass {bag / "images.bag_0.db3"} to read it without metadata.yaml' in stderr

    # The storage file alone is read by its own topic list.
    code, stdout, stderr = _run([bag / 'images.bag_0.db3', '--image-topic', '/image',
                                 '--out', out], capsys)
    assert code == 0 and 'frames kept: 3' in stdout, stderr


def test_real_bag_whose_metadata_miscounts_gets_a_note(realdata, tmp_path, capsys):
    bag = tmp_path / 'images.bag'
    shutil.copytree(realdata / 'ros2' / 'ait_ros2bag_tools' / 'images.bag', bag)
    _edit_metadata(bag, 'message_count: 3', 'message_count: 5')
    code, stdout, stderr = _run([bag, '--image-topic', '/image', '--out', tmp_path / 'out'],
                                capsys)
    assert code == 0, stderr
    assert 'frames kept: 3' in stdout
    assert 'note: images.bag: the index lists 5 messages on /image, 3 were read' in stdout


def test_real_2019_db3_without_metadata(realdata, tmp_path, capsys):
    folder = realdata / 'ros2' / 'klintan_rosbag2js'
    out = tmp_path / 'webcam'
    code, _, stderr = _run([folder, '--image-topic', '/image', '--out', out], capsys)
    _assert_clean_failure(code, stderr, tmp_path, out, 'has no metadata.yaml')
    assert str(folder / 'sample.db3') in stderr

    code, stdout, stderr = _run([
        folder / 'sample.db3', '--image-topic', '/image', '--image-topic', '/image/compressed',
        '--caption-topic', '/text', '--caption-max-age', '1000000', '--out', out], capsys)
    assert code == 0, stderr
    dataset = read_annotations(out)
    topics = sorted(image['topic'] for image in dataset['images'])
    assert topics == ['/image', '/image/compressed']
    assert all((image['width'], image['height']) == (640, 480) for image in dataset['images'])
    assert [note['caption'] for note in dataset['annotations']] == ['Hello World'] * 2
    # With the default 5 s, the one 'Hello World' (days before the frames) is too old.
    code, stdout, _ = _run([folder / 'sample.db3', '--image-topic', '/image', '--caption-topic',
                            '/text', '--out', tmp_path / 'strict'], capsys)
    assert code == 0 and 'no_caption: 1' in stdout


@pytest.mark.parametrize('storage', ['test_bag_mcap', 'test_bag_sqlite3'])
def test_real_malformed_payloads_are_skipped_and_counted(realdata, tmp_path, capsys, storage):
    bag = realdata / 'ros2' / 'rosbags_rs' / storage
    out = tmp_path / 'malformed'
    code, stdout, stderr = _run([
        bag, '--image-topic', '/test/sensor_msgs/image',
        '--image-topic', '/test/sensor_msgs/compressed_image', '--out', out], capsys)
    assert code == 0, stderr
    assert 'frames read: 4' in stdout and 'frames kept: 0' in stdout
    assert '  bad_size: 2' in stdout and '  undecodable: 2' in stdout
    assert read_annotations(out)['images'] == []


# Every flag as the README and docs/bag_to_coco.md spell it; a rename breaks users' scripts.
FLAGS = {'-h', '--help', '--image-topic', '--out', '--caption-topic', '--caption-max-age',
         '--captions-file', '--auto-caption', '--auto-caption-prompt',
         '--auto-caption-batch-size', '--max-new-tokens', '--device', '--keep-uncaptioned',
         '--every-n', '--min-interval', '--max-frames', '--dedup', '--dedup-threshold',
         '--trust-remote-code', '--max-pixels', '--image-format', '--jpeg-quality',
         '--progress-every', '--quiet'}


def test_the_command_line_takes_every_default_from_conversion_options():
    """Each default is written once, in ConversionOptions; the parser and --help read it."""
    parser = bag_to_coco.build_parser()
    values = vars(parser.parse_args(['x.bag', '--image-topic', '/cam', '--out', 'dataset']))
    assert values.pop('bags') == ['x.bag'] and values.pop('quiet') is False
    assert values.pop('progress_every') == bag_to_coco.PROGRESS_INTERVAL_S
    expected = bag_to_coco.ConversionOptions(image_topics=['/cam'], out='dataset')
    assert set(values) == {option.name for option in dataclasses.fields(expected)}
    for name, value in values.items():
        assert value == getattr(expected, name), name
    assert bag_to_coco.ConversionOptions(**values) == expected

    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert flags == FLAGS
    for action in parser._actions:
        if action.option_strings and not action.required and action.default != argparse.SUPPRESS:
            assert '(default: ' in action.help, action.option_strings
    help_text = ' '.join(parser.format_help().split())
    assert '--caption-max-age SECONDS a topic caption older than this does not apply ' \
           '(default: 5)' in help_text
    assert '--max-new-tokens N longest --auto-caption caption, in tokens (default: 30)' in (
        help_text)
