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

"""The synthetic factory scenes, and the bag of footage recorded from them."""

from collections import Counter
import json

from blip2_ros.demo.synthetic_factory import (caption_for, COLOURS, DEFAULT_SPEC, iter_scenes,
                                              KINDS, make_layout, parse_size, render_layout,
                                              render_scene, scene_at, SceneSpec, SceneSpecError)
import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from rosbags.typesys import get_typestore, Stores
from training.demo_model import DemoRecipe
from training.record_synthetic_bag import DEFAULT_START_SEC, main as record_main

# OpenCV hue (0..180) of each colour name; the test reads colours from pixels, not the layout.
HUES = {'red': 0, 'yellow': 26, 'green': 64, 'blue': 112}
SIZES = [(64, 64), (48, 64), (480, 640), (1080, 1920)]


def read_items(image):
    """
    Find the items in a frame from its pixels alone: saturated blobs, their colour and shape.

    Belt, walls and arm are grey, so every saturated blob is an item. Its kind follows from
    its outline: bottles stand tall, bolts lie long, a box fills its bounding box and a gear
    (teeth and a hole) fills much less of it.
    """
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    mask = ((hsv[..., 1] > 110) & (hsv[..., 2] > 70)).astype(np.uint8)
    found, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(4, 0.0015 * image.shape[0] * image.shape[1])
    items = []
    for label in range(1, found):
        x, y, width, height, area = stats[label]
        if area < min_area:
            continue
        hue = float(np.median(hsv[..., 0][labels == label]))
        colour = min(HUES, key=lambda name: min(abs(hue - HUES[name]),
                                                180 - abs(hue - HUES[name])))
        aspect, fill = width / height, area / (width * height)
        if aspect < 0.75:
            kind = 'bottle'
        elif aspect > 1.5:
            kind = 'bolt'
        else:
            kind = 'box' if fill > 0.705 else 'gear'
        items.append({'colour': colour, 'kind': kind, 'box': (x, y, x + width, y + height)})
    return items


def test_same_seed_and_index_give_the_same_frame():
    first = scene_at(3, 7, (64, 64))
    again = scene_at(3, 7, (64, 64))
    assert np.array_equal(first.image, again.image)
    assert first.caption == again.caption and first.layout == again.layout
    assert np.array_equal(render_scene(42).image, render_scene(42).image)
    streamed = list(iter_scenes(5, seed=3, size=(64, 64), start=5))
    assert [scene.caption for scene in streamed] == [scene_at(3, i).caption for i in range(5, 10)]
    assert np.array_equal(streamed[2].image, first.image)
    assert not np.array_equal(scene_at(4, 7).image, first.image)
    assert not np.array_equal(scene_at(3, 8).image, first.image)


def test_the_demo_streams_share_no_frame():
    """The demo model's fresh-frame score and the live demo use frames training never saw."""
    recipe = DemoRecipe()
    streams = ((recipe.seed, recipe.frames), (recipe.fresh_seed, recipe.fresh_frames),
               (2026, 300))  # 2026: the demo camera's default --seed
    seen = {}
    for seed, count in streams:
        for index in range(count):
            layout = scene_at(seed, index, (16, 16)).layout
            assert layout not in seen, f'frame {index} of stream {seed} is {seen.get(layout)}'
            seen[layout] = (seed, index)


def test_count_colour_and_kind_vary_independently_and_uniformly():
    attributes = [scene.attributes for scene in iter_scenes(1200, seed=11)]
    combinations = Counter((a['count'], a['colour'], a['kind']) for a in attributes)
    # Every combination occurs: no attribute decides another.
    assert len(combinations) == DEFAULT_SPEC.num_captions == 48
    for name, values in (('count', (1, 2, 3)), ('colour', tuple(COLOURS)), ('kind', KINDS)):
        share = Counter(a[name] for a in attributes)
        assert set(share) == set(values)
        for value in values:
            assert abs(share[value] / len(attributes) - 1 / len(values)) < 0.05, (name, share)
    # Always answering the most common caption stays near chance level, far below a model.
    assert max(combinations.values()) / len(attributes) < 0.05
    # Colour does not depend on kind: each kind comes in every colour about equally often.
    for kind in KINDS:
        colours = Counter(a['colour'] for a in attributes if a['kind'] == kind)
        assert min(colours.values()) > 0.5 * max(colours.values()), (kind, colours)


@pytest.mark.parametrize('size,frames', [((64, 64), 300), ((48, 64), 100), ((480, 640), 60),
                                         ((1080, 1920), 8)])
def test_the_picture_shows_what_the_caption_says(size, frames):
    for scene in iter_scenes(frames, seed=21, size=size):
        layout = scene.layout
        assert scene.caption == caption_for(layout.count, layout.colour, layout.kind)
        items = read_items(scene.image)
        assert len(items) == layout.count, (size, scene.caption)
        assert {item['colour'] for item in items} == {layout.colour}, scene.caption
        assert {item['kind'] for item in items} == {layout.kind}, scene.caption
        # The item boxes the scene reports cover what the pixels show.
        for item in items:
            x0, y0, x1, y1 = item['box']
            assert any(bx0 - 1 <= x0 and by0 - 1 <= y0 and x1 <= bx1 + 1 and y1 <= by1 + 1
                       for bx0, by0, bx1, by1 in scene.boxes), (item, scene.boxes)


def test_caption_wording():
    assert caption_for(1, 'red', 'box') == 'one red box on the conveyor'
    assert caption_for(2, 'blue', 'box') == 'two blue boxes on the conveyor'
    assert caption_for(3, 'yellow', 'bolt') == 'three yellow bolts on the conveyor'
    scene = next(scene for scene in iter_scenes(50, seed=2) if scene.layout.count == 1)
    assert scene.caption.split()[0] == 'one' and not scene.caption.split()[2].endswith('s')


@pytest.mark.parametrize('size', SIZES)
def test_every_resolution_renders_the_same_scene(size):
    for index in range(6):
        small = scene_at(5, index, (64, 64))
        scene = scene_at(5, index, size)
        assert scene.image.shape == (*size, 3) and scene.image.dtype == np.uint8
        assert scene.image.flags['C_CONTIGUOUS']
        assert scene.caption == small.caption and scene.layout == small.layout
        height, width = size
        boxes = sorted(scene.boxes)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        for left, right in zip(boxes, boxes[1:]):
            assert left[2] <= right[0], 'items overlap'


def test_sizes_are_parsed_and_checked():
    assert parse_size('640x480') == (480, 640)
    assert parse_size('64X64') == (64, 64)
    for bad in ('640', '640x', 'ax480', '8x8', '640x480x3'):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError, match='too small'):
        scene_at(0, 0, (8, 64))
    with pytest.raises(ValueError):
        scene_at(-1, 0)


def test_frames_vary_beyond_the_caption():
    """Position, size, noise and the arm change between frames with one caption."""
    by_caption = {}
    for scene in iter_scenes(400, seed=8):
        by_caption.setdefault(scene.caption, []).append(scene)
    caption, scenes = max(by_caption.items(), key=lambda entry: len(entry[1]))
    assert len(scenes) >= 4
    assert len({scene.boxes for scene in scenes}) == len(scenes), caption
    assert len({scene.layout.arm_angles for scene in scenes}) == len(scenes)
    clean, _ = render_layout(scenes[0].layout, (64, 64))
    difference = np.abs(clean.astype(int) - scenes[0].image.astype(int))
    assert 0.5 < difference.mean() < 6, 'sensor noise is light but present'


def test_vocabulary_and_number_of_captions():
    captions = DEFAULT_SPEC.captions()
    assert len(captions) == len(set(captions)) == DEFAULT_SPEC.num_captions == 48
    assert DEFAULT_SPEC.chance_level == pytest.approx(1 / 48)
    vocabulary = set(DEFAULT_SPEC.vocabulary())
    assert vocabulary == {word for caption in captions for word in caption.split()}
    assert {'one', 'three', 'box', 'boxes', 'bolts', 'yellow', 'conveyor'} <= vocabulary
    for scene in iter_scenes(100, seed=1):
        assert scene.caption in captions
        assert set(scene.caption.split()) <= vocabulary

    small = SceneSpec(counts=(2, 3), colours=('red', 'blue'), kinds=('gear',))
    assert small.num_captions == 4
    assert small.vocabulary() == ('blue', 'conveyor', 'gears', 'on', 'red', 'the', 'three',
                                  'two')
    scenes = list(iter_scenes(40, seed=0, spec=small))
    assert {scene.caption for scene in scenes} == set(small.captions())
    with pytest.raises(SceneSpecError, match='kinds'):
        SceneSpec(kinds=('box', 'cat'))
    with pytest.raises(SceneSpecError, match='counts'):
        SceneSpec(counts=())
    with pytest.raises(SceneSpecError, match='colours'):
        SceneSpec(colours=('red', 'red'))


def test_layout_draws_do_not_depend_on_resolution():
    rng_a, rng_b = np.random.default_rng(99), np.random.default_rng(99)
    assert make_layout(rng_a) == make_layout(rng_b)
    assert render_scene(np.random.default_rng(99), (64, 64)).caption == \
        render_scene(np.random.default_rng(99), (1080, 1920)).caption


# The recorded bag: what `ros2 bag record` would capture from the factory camera.

def read_bag(path):
    """Return {topic: [(log_time_ns, message)]} and the topic types of a rosbag2 bag."""
    typestore = get_typestore(Stores.ROS2_JAZZY)
    messages, types = {}, {}
    with Reader(path) as reader:
        for connection in reader.connections:
            types[connection.topic] = connection.msgtype
        for connection, time_ns, rawdata in reader.messages():
            message = typestore.deserialize_cdr(rawdata, connection.msgtype)
            messages.setdefault(connection.topic, []).append((time_ns, message))
    return messages, types


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
def test_recorded_bag_holds_the_camera_topics_frame_for_frame(tmp_path, storage, capsys):
    bag = tmp_path / 'footage'
    frames, rate = 25, 5.0
    assert record_main(['--out', str(bag), '--frames', str(frames), '--rate-hz', str(rate),
                        '--size', '64x48', '--seed', '9', '--storage', storage,
                        '--compressed']) == 0
    assert f'wrote {frames} frames' in capsys.readouterr().out
    messages, types = read_bag(bag)
    assert types == {'/camera/image_raw': 'sensor_msgs/msg/Image',
                     '/camera/image_raw/compressed': 'sensor_msgs/msg/CompressedImage',
                     '/factory/true_caption': 'std_msgs/msg/String',
                     '/factory/truth': 'std_msgs/msg/String'}
    assert {topic: len(entries) for topic, entries in messages.items()} == {
        topic: frames for topic in types}
    start_ns = int(DEFAULT_START_SEC * 1e9)
    for index in range(frames):
        scene = scene_at(9, index, (48, 64))
        time_ns, image = messages['/camera/image_raw'][index]
        assert time_ns == start_ns + index * 200_000_000
        assert image.header.stamp.sec * 10**9 + image.header.stamp.nanosec == time_ns
        assert (image.height, image.width, image.encoding, image.step) == (48, 64, 'rgb8', 192)
        assert image.header.frame_id == 'factory_camera'
        assert np.array_equal(image.data.reshape(48, 64, 3), scene.image)
        # The caption comes just before its frame, so "latest caption" finds it.
        caption_time, caption = messages['/factory/true_caption'][index]
        assert caption.data == scene.caption
        previous_frame = messages['/camera/image_raw'][index - 1][0] if index else 0
        assert previous_frame < caption_time < time_ns
        truth_time, truth = messages['/factory/truth'][index]
        truth = json.loads(truth.data)
        assert truth['index'] == index and truth['caption'] == scene.caption
        assert truth['stamp'] == {'sec': image.header.stamp.sec,
                                  'nanosec': image.header.stamp.nanosec}
        jpeg_time, jpeg = messages['/camera/image_raw/compressed'][index]
        assert jpeg_time == time_ns and jpeg.header.stamp == image.header.stamp
        decoded = cv2.cvtColor(cv2.imdecode(jpeg.data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(decoded.astype(int) - scene.image.astype(int)).mean() < 10


def test_recording_is_deterministic_and_refuses_bad_requests(tmp_path, capsys):
    args = ['--frames', '6', '--size', '32x32', '--seed', '4']
    assert record_main(['--out', str(tmp_path / 'a')] + args) == 0
    assert record_main(['--out', str(tmp_path / 'b')] + args) == 0
    first, _ = read_bag(tmp_path / 'a')
    second, _ = read_bag(tmp_path / 'b')
    assert first.keys() == second.keys() == {'/camera/image_raw', '/factory/true_caption',
                                             '/factory/truth'}
    for topic in first:
        assert [(t, str(m)) for t, m in first[topic]] == [(t, str(m)) for t, m in second[topic]]
    capsys.readouterr()

    assert record_main(['--out', str(tmp_path / 'a')] + args) == 1
    assert 'already exists' in capsys.readouterr().err
    for bad, message in ((['--size', '8x8'], 'too small'), (['--frames', '0'], 'at least 1'),
                         (['--rate-hz', '0'], 'rate-hz'), (['--kinds', 'box,cat'], 'kinds')):
        out = tmp_path / 'bad'
        argv = ['--out', str(out), '--frames', '3'] + bad
        assert record_main(argv) == 1
        error = capsys.readouterr().err
        assert message in error and 'Traceback' not in error and error.count('\n') == 1
        assert not out.exists(), 'no half-written bag is left behind'


def test_recording_with_a_narrower_scene_spec(tmp_path, capsys):
    bag = tmp_path / 'gears'
    assert record_main(['--out', str(bag), '--frames', '30', '--kinds', 'gear,box',
                        '--counts', '1', '--caption-topic', '', '--truth-topic', '']) == 0
    assert 'of 8 possible captions appear, chance level 12.5%' in capsys.readouterr().out
    messages, types = read_bag(bag)
    assert set(types) == {'/camera/image_raw'}
    for _, image in messages['/camera/image_raw']:
        items = read_items(image.data.reshape(image.height, image.width, 3))
        assert len(items) == 1 and items[0]['kind'] in ('gear', 'box')
