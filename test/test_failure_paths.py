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
Failure paths of the node and the folder captioner, over real DDS with tiny real models.

A model whose scores turn NaN or that says nothing, a fuzzed mix of broken and good frames on
two cameras, out of memory during generation, and the adapter in use named wherever captions
come out.
"""

import array
import shutil
import struct
import time
import weakref
import zlib

from blip2_ros import caption_images
from blip2_ros.captioner import (Blip2Captioner, CaptionerConfig, EMPTY_CAPTION,
                                 NON_FINITE_SCORES)
from blip2_ros.server_captioner import CaptionFailure
import cv2
import numpy as np
import pytest
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import image_message, jpeg_message, make_frame, statuses, wait_for
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import SetBool, Trigger
import torch
from vllm_server import build_lora_training_output

pytestmark = pytest.mark.ros


@pytest.fixture(scope='module')
def nan_opt_checkpoint(lively_opt_checkpoint, tmp_path_factory):
    """
    Return a copy of the lively OPT checkpoint whose image projection is NaN.

    Every score of its language model is then NaN, as after a float16 overflow or a broken
    fine-tune.
    """
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp('nan') / 'opt'
    shutil.copytree(lively_opt_checkpoint, folder)
    weights = load_file(folder / 'model.safetensors')
    weights['language_projection.weight'] = torch.full_like(
        weights['language_projection.weight'], float('nan'))
    save_file(weights, folder / 'model.safetensors', metadata={'format': 'pt'})
    return folder


def values_of(harness):
    """Return the key/value pairs of the newest captioning status on /diagnostics."""
    wait_for(lambda: harness.diagnostics, what='diagnostics')
    return {value.key: value.value for value in harness.diagnostics[-1].status[0].values}


# NaN or inf scores, and empty captions -----------------------------------------------------


@pytest.mark.parametrize('cache', ['dynamic', 'static'])  # generate(), the decode loop
def test_nan_scores_are_caught_per_frame_in_either_decoder(lively_opt_checkpoint, cache):
    captioner = Blip2Captioner(CaptionerConfig(model=str(lively_opt_checkpoint), cache=cache,
                                               max_new_tokens=4, device='cpu'))
    frames = [make_frame(1), make_frame(2)]
    alone = captioner.caption([frames[1]])[0]
    # Ruling the end token out (-inf, as warm-up does) is no fault of the model.
    assert isinstance(captioner.caption([frames[1]], failures=True, min_new_tokens=4)[0], str)
    project = captioner.model.language_projection.forward

    def nan_for_the_first_frame(queries):
        # What a float16 overflow does to one image: its queries become NaN.
        features = project(queries)
        features[0] = float('nan')
        return features

    captioner.model.language_projection.forward = nan_for_the_first_frame
    assert captioner.caption(frames) == ['', alone]
    failure, caption = captioner.caption(frames, failures=True)
    assert isinstance(failure, CaptionFailure) and failure.reason == 'non_finite_scores'
    assert str(failure) == NON_FINITE_SCORES and 'dtype float32' in str(failure)
    assert caption == alone


def test_nan_scores_are_counted_said_and_never_published(harness_factory, nan_opt_checkpoint):
    harness = harness_factory(nan_opt_checkpoint, ['/a', '/b'], max_new_tokens=4,
                              stale_input_timeout=60.0)
    cameras = {topic: harness.publisher(Image, topic) for topic in ('/a', '/b')}
    cameras['/a'].publish(image_message(make_frame(10), stamp_sec=1))
    wait_for(lambda: harness.node.statistics()['dropped_frames'] == 1, what='a dropped frame')
    cameras['/b'].publish(image_message(make_frame(11), stamp_sec=2))
    wait_for(lambda: harness.node.statistics()['dropped_frames'] == 2, what='a dropped frame')
    stats = harness.node.statistics()
    assert stats['dropped_by_reason'] == {'non_finite_scores': 2}
    assert stats['captions_published'] == 0
    for topic in ('/a', '/b'):
        assert stats['cameras'][topic]['dropped_by_reason'] == {'non_finite_scores': 1}
    response = harness.call(Trigger, '/blip2_caption/caption_now', Trigger.Request())
    assert not response.success and response.message == NON_FINITE_SCORES
    wait_for(lambda: any(status.level == status.WARN and 'NaN or inf scores' in status.message
                         and 'not published: try dtype float32' in status.message
                         for status in statuses(harness)),
             what='a warning on /diagnostics')
    wait_for(lambda: values_of(harness).get('dropped_non_finite_scores') == '3',
             what='the count on /diagnostics')
    assert values_of(harness)['dropped /b'] == '1'  # caption_now captioned its frame again
    time.sleep(0.3)
    assert harness.captions == [] and harness.infos == []


def test_an_empty_caption_is_never_published_but_counted_and_said(
        harness_factory, tiny_opt_checkpoint, tmp_path, capsys):
    # At the builder's small init the tiny model ends every caption at once.
    harness = harness_factory(tiny_opt_checkpoint, ['/a', '/b'], max_new_tokens=4,
                              stale_input_timeout=60.0)
    cameras = {topic: harness.publisher(Image, topic) for topic in ('/a', '/b')}
    cameras['/a'].publish(image_message(make_frame(10), stamp_sec=1))
    cameras['/b'].publish(image_message(make_frame(11), stamp_sec=2))
    wait_for(lambda: harness.node.statistics()['dropped_frames'] == 2, what='two dropped frames')
    stats = harness.node.statistics()
    assert stats['dropped_by_reason'] == {'empty_caption': 2}
    assert stats['captions_published'] == 0
    for topic in ('/a', '/b'):
        camera = stats['cameras'][topic]
        assert camera['dropped_by_reason'] == {'empty_caption': 1} and camera['captioned'] == 0
    response = harness.call(Trigger, '/blip2_caption/caption_now', Trigger.Request())
    assert not response.success and response.message == EMPTY_CAPTION
    wait_for(lambda: any(status.level == status.WARN and 'empty captions' in status.message
                         and 'not published' in status.message
                         and 'try the prompt the model was trained with' in status.message
                         for status in statuses(harness)),
             what='a warning on /diagnostics')
    wait_for(lambda: values_of(harness).get('dropped_empty_caption') == '3',
             what='the count on /diagnostics')
    time.sleep(0.3)
    assert harness.captions == [] and harness.infos == []
    # The folder captioner names each such file and captions nothing.
    cv2.imwrite(str(tmp_path / 'belt.png'), make_frame(12))
    status = caption_images.main(['--model', str(tiny_opt_checkpoint), '--max-new-tokens', '4',
                                  str(tmp_path)])
    out, err = capsys.readouterr()
    assert out == '' and status == caption_images.EXIT_NOTHING_CAPTIONED
    assert (f'caption_images: {tmp_path / "belt.png"}: no caption ({EMPTY_CAPTION}), skipped'
            in err.splitlines())


def test_caption_images_names_each_file_with_nan_scores(
        tmp_path, nan_opt_checkpoint, lively_opt_checkpoint, capsys):
    for name in ('belt.png', 'gate.png'):
        cv2.imwrite(str(tmp_path / name), make_frame(len(name)))
    status = caption_images.main(['--model', str(nan_opt_checkpoint), '--max-new-tokens', '4',
                                  str(tmp_path)])
    out, err = capsys.readouterr()
    assert out == '' and status == caption_images.EXIT_NOTHING_CAPTIONED
    for name in ('belt.png', 'gate.png'):
        (line,) = [line for line in err.splitlines() if name in line]
        assert line == (f'caption_images: {tmp_path / name}: no caption '
                        f'({NON_FINITE_SCORES}), skipped')
    assert 'captioned 0 images, skipped 2' in err
    # The same images with sound weights: every one captioned.
    assert caption_images.main(['--model', str(lively_opt_checkpoint), '--max-new-tokens', '4',
                                str(tmp_path)]) == caption_images.EXIT_OK


# Fuzzing: every frame is accounted for ----------------------------------------------------


def jpeg_bomb():
    """Return a small JPEG whose header claims 60000x60000 pixels."""
    ok, encoded = cv2.imencode('.jpg', np.zeros((16, 16, 3), np.uint8))
    data = bytearray(encoded.tobytes())
    start = data.index(b'\xff\xc0')  # baseline frame header: length, precision, height, width
    data[start + 5:start + 9] = struct.pack('>HH', 60000, 60000)
    return bytes(data)


def png_bomb():
    """Return a PNG of a few hundred bytes that inflates to 20000x20000 grey pixels."""
    width = height = 20000
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)

    def chunk(kind, body):
        return (struct.pack('>I', len(body)) + kind + body
                + struct.pack('>I', zlib.crc32(kind + body)))
    rows = zlib.compress(bytes(width + 1) * 16)  # the first rows; the rest never get decoded
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', rows)
            + chunk(b'IEND', b''))


def compressed(data, fmt='rgb8; jpeg compressed bgr8'):
    message = CompressedImage(format=fmt)
    message.data = array.array('B', data)
    return message


def raw_kinds():
    """Return {kind: (message maker, expected outcome)} for a raw Image camera."""
    def wrong_size(seed):
        message = image_message(make_frame(seed))
        message.data = array.array('B', bytes(len(message.data) - 7))
        return message

    def wrong_encoding(seed):
        message = image_message(make_frame(seed))
        message.encoding = 'RGB8'  # ROS spells it rgb8, and so must a camera
        return message

    def big_endian_rgb16(seed, broken=False):
        frame = make_frame(seed).astype('>u2') * 257
        message = Image(height=48, width=64, encoding='rgb16', is_bigendian=1, step=64 * 6)
        message.data = array.array('B', frame.tobytes()[:-2 if broken else None])
        return message

    def short_step(seed):
        message = image_message(make_frame(seed))
        message.step = 10
        return message

    return {
        'good': (lambda seed: image_message(make_frame(seed)), 'captioned'),
        'good_bgr8': (lambda seed: image_message(make_frame(seed), encoding='bgr8'),
                      'captioned'),
        'good_big_endian_rgb16': (big_endian_rgb16, 'captioned'),
        'broken_big_endian_rgb16': (lambda seed: big_endian_rgb16(seed, broken=True),
                                    'bad_size'),
        'wrong_size': (wrong_size, 'bad_size'),
        'wrong_encoding': (wrong_encoding, 'unknown_encoding'),
        'short_step': (short_step, 'bad_step'),
        'empty': (lambda seed: Image(encoding='rgb8'), 'empty'),
        'too_large': (lambda seed: image_message(make_frame(seed, 200, 200)), 'too_large'),
    }


def compressed_kinds():
    """Return {kind: (message maker, expected outcome)} for a CompressedImage camera."""
    rng = np.random.default_rng(0)
    jpeg_bytes, png_bytes = jpeg_bomb(), png_bomb()

    def good_png(seed):
        ok, encoded = cv2.imencode('.png', make_frame(seed))
        return compressed(encoded.tobytes(), 'rgb8; png compressed bgr8')

    def truncated_jpeg(seed):
        message = jpeg_message(make_frame(seed))
        message.data = message.data[:len(message.data) // 2]
        return message

    return {
        'good_jpeg': (jpeg_message_of, 'captioned'),
        'good_png': (good_png, 'captioned'),
        'jpeg_bomb': (lambda seed: compressed(jpeg_bytes), 'too_large'),
        'png_bomb': (lambda seed: compressed(png_bytes, 'png'), 'too_large'),
        'garbage': (lambda seed: compressed(rng.integers(0, 256, 500, np.uint8).tobytes()),
                    'undecodable'),
        'truncated_jpeg': (truncated_jpeg, 'undecodable'),
        'no_data': (lambda seed: compressed(b''), 'empty'),
        'unknown_codec': (lambda seed: compressed(b'\x00' * 64, 'rgb8; webp compressed'),
                          'unknown_encoding'),
    }


def jpeg_message_of(seed):
    return jpeg_message(make_frame(seed))


def outcomes(camera):
    """Return what became of a camera's frames, by outcome, from the node's statistics."""
    counted = dict(camera['rejected_by_reason'])
    for reason, count in camera['dropped_by_reason'].items():
        counted[f'dropped_{reason}'] = count
    counted['captioned'] = camera['captioned']
    return {outcome: count for outcome, count in counted.items() if count}


def arrived(node, topic, count, timeout=5.0):
    """Wait, polling fast, until ``topic``'s camera has received ``count`` frames."""
    deadline = time.monotonic() + timeout
    while node.cameras[topic].received < count:
        assert time.monotonic() < deadline, f'frame {count} on {topic} never arrived'
        time.sleep(0.0005)


def accounted(camera):
    """Every frame a camera received has been captioned, rejected, dropped or replaced."""
    return not camera['pending'] and camera['received'] == (
        camera['captioned'] + camera['rejected'] + camera['dropped'] + camera['replaced'])


def test_fuzzed_frames_on_two_cameras_are_all_accounted_for_and_captioning_goes_on(
        harness_factory, talkative_opt_checkpoint):
    topics = {'/fuzz/raw': raw_kinds(), '/fuzz/raw/compressed': compressed_kinds()}
    harness = harness_factory(talkative_opt_checkpoint, list(topics), max_pixels=100 * 100,
                              max_new_tokens=2, reliability='reliable',
                              stale_input_timeout=60.0)
    node = harness.node
    publishers = {topic: harness.publisher(Image if topic == '/fuzz/raw' else CompressedImage,
                                           topic) for topic in topics}
    # One of every kind on both cameras at once, each waited for: exact counts per reason.
    expected = {topic: {} for topic in topics}
    rounds = max(len(kinds) for kinds in topics.values())
    for index in range(rounds):
        for topic, kinds in topics.items():
            make, outcome = list(kinds.values())[index % len(kinds)]
            publishers[topic].publish(make(index))
            expected[topic][outcome] = expected[topic].get(outcome, 0) + 1
        wait_for(lambda index=index: all(
            camera['received'] == index + 1 and not camera['pending']
            for camera in node.statistics()['cameras'].values()), what='both frames')
    wait_for(lambda: all(map(accounted, node.statistics()['cameras'].values())),
             what='the first frames accounted for')
    for topic, camera in node.statistics()['cameras'].items():
        assert camera['replaced'] == 0
        assert outcomes(camera) == expected[topic], topic
    # Then hundreds, each as soon as the node has the one before: newer frames replace older
    # ones that wait for the model, and none goes uncounted. (Without the wait, DDS would
    # drop most of them before the node sees them, which the node cannot count.)
    rng = np.random.default_rng(1)
    sent = {topic: rounds for topic in topics}
    for index in range(200):
        for topic, kinds in topics.items():
            make, _ = list(kinds.values())[rng.integers(len(kinds))]
            publishers[topic].publish(make(1000 + index))
            sent[topic] += 1
            arrived(node, topic, sent[topic])
    wait_for(lambda: all(camera['received'] == sent[topic] and accounted(camera)
                         for topic, camera in node.statistics()['cameras'].items()),
             what='every frame accounted for')
    stats = node.statistics()
    assert all(camera['replaced'] and camera['captioned'] > expected[topic].get('captioned', 0)
               for topic, camera in stats['cameras'].items()), stats['cameras']
    for topic, camera in stats['cameras'].items():
        assert set(outcomes(camera)) <= set(expected[topic]), topic
    # Per reason, the cameras add up to the node's totals, here and on /diagnostics.
    for key in ('rejected_by_reason', 'dropped_by_reason'):
        total = {}
        for camera in stats['cameras'].values():
            for reason, count in camera[key].items():
                total[reason] = total.get(reason, 0) + count
        assert total == stats[key]
    assert stats['captions_published'] == sum(
        camera['captioned'] for camera in stats['cameras'].values())

    def diagnostics_agree():
        values = values_of(harness)
        return all(values.get(f'{name} {topic}') == str(stats['cameras'][topic][name])
                   for topic in topics for name in ('received', 'captioned', 'rejected',
                                                    'dropped', 'replaced'))
    wait_for(diagnostics_agree, what='the counts on /diagnostics')
    # And the node still captions.
    infos = len(harness.infos)
    publishers['/fuzz/raw'].publish(image_message(make_frame(5), stamp_sec=77))
    wait_for(lambda: any(info['stamp']['sec'] == 77 for info in harness.infos[infos:]),
             what='a caption after the fuzzing')


# A camera whose QoS cannot connect ---------------------------------------------------------


def test_a_best_effort_camera_and_a_reliable_node_are_named_with_the_fix_on_diagnostics(
        harness_factory, lively_opt_checkpoint):
    harness = harness_factory(lively_opt_checkpoint, ['/cam'], reliability='reliable',
                              stale_input_timeout=60.0)
    harness.peer.create_publisher(
        Image, '/cam', QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
    wait_for(lambda: any(
        status.level == status.WARN and 'a publisher on /cam has an incompatible QoS '
        "(RELIABILITY): set the node's reliability parameter to best_effort" in status.message
        for status in statuses(harness)), what='the fix on /diagnostics')


# Out of memory during generation ----------------------------------------------------------


def test_out_of_memory_in_generation_drops_the_batch_frees_it_and_goes_on_smaller(
        harness_factory, lively_opt_checkpoint, monkeypatch):
    harness = harness_factory(lively_opt_checkpoint, ['/a', '/b'], max_new_tokens=4,
                              max_batch_size=2, stale_input_timeout=60.0)
    node = harness.node
    model = node.captioner.model
    generate, batch_sizes, held = model.generate, [], []

    def out_of_memory_once(pixel_values, **kwargs):
        batch_sizes.append(pixel_values.shape[0])
        if len(batch_sizes) == 1:
            # A tensor of the failed step, as a GPU would hold its activations.
            activations = torch.empty(pixel_values.shape[0], 1 << 20)
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return generate(pixel_values=pixel_values, **kwargs)

    freed_before_emptying = []
    empty_cache = torch.cuda.empty_cache

    def watched_empty_cache():
        freed_before_emptying.append(all(ref() is None for ref in held))
        empty_cache()

    monkeypatch.setattr(model, 'generate', out_of_memory_once)
    monkeypatch.setattr(torch.cuda, 'empty_cache', watched_empty_cache)
    publishers = {topic: harness.publisher(Image, topic) for topic in ('/a', '/b')}
    harness.call(SetBool, '/blip2_caption/enable', SetBool.Request(data=False))
    for seed, topic in enumerate(('/a', '/b')):
        publishers[topic].publish(image_message(make_frame(seed), stamp_sec=seed + 1))
    wait_for(lambda: all(camera['received'] == 1
                         for camera in node.statistics()['cameras'].values()),
             what='both frames')
    harness.call(SetBool, '/blip2_caption/enable', SetBool.Request(data=True))
    wait_for(lambda: node.statistics()['oom_batches'] == 1, what='the batch to run out')
    # Counted inside the except clause; the memory is released just after it.
    wait_for(lambda: freed_before_emptying, what='the memory of the failed batch to be released')
    stats = node.statistics()
    assert stats['dropped_by_reason'] == {'out_of_memory': 2}
    assert all(camera['dropped_by_reason'] == {'out_of_memory': 1}
               for camera in stats['cameras'].values())
    assert freed_before_emptying == [True], 'the failed batch still held its tensors'
    wait_for(lambda: any(status.level == status.WARN and 'out of GPU memory' in status.message
                         and 'batches lowered to 1' in status.message
                         and 'lower max_batch_size' in status.message
                         for status in statuses(harness)),
             what='a warning on /diagnostics')
    for seed, topic in enumerate(('/a', '/b'), start=10):
        publishers[topic].publish(image_message(make_frame(seed), stamp_sec=seed))
    infos = harness.wait_for_infos(2)
    assert sorted(info['stamp']['sec'] for info in infos) == [10, 11]
    assert batch_sizes == [2, 1, 1]
    assert harness.spinner.is_alive()


# The adapter in use is named ---------------------------------------------------------------


@pytest.fixture(scope='module')
def trained_adapter(lively_opt_checkpoint, tmp_path_factory):
    """Return a LoRA adapter for the lively checkpoint whose metadata names its prompt."""
    return build_lora_training_output(lively_opt_checkpoint,
                                      tmp_path_factory.mktemp('adapter') / 'lora',
                                      std=0.5, seed=5, prompt='a photo of')


def test_the_adapter_and_its_training_prompt_are_named_next_to_the_base_model(
        harness_factory, lively_opt_checkpoint, trained_adapter, capfd):
    harness = harness_factory(lively_opt_checkpoint, ['/cam'], adapter=str(trained_adapter),
                              max_new_tokens=4, stale_input_timeout=60.0)
    (loaded,) = [line for line in capfd.readouterr().err.splitlines() if "loaded '" in line]
    assert (f"loaded '{lively_opt_checkpoint}' with adapter '{trained_adapter}' "
            "(trained with prompt 'a photo of')") in loaded
    harness.publisher(Image, '/cam').publish(image_message(make_frame(1), stamp_sec=1))
    (info,) = harness.wait_for_infos(1)
    assert info['model'] == str(lively_opt_checkpoint)
    assert info['adapter'] == str(trained_adapter)
    assert info['adapter_training_prompt'] == 'a photo of'
    # A status sent while the model loaded names no adapter yet: wait for one sent after.
    wait_for(lambda: values_of(harness).get('adapter') == str(trained_adapter),
             what='the adapter on /diagnostics')
    values = values_of(harness)
    assert values['model'] == str(lively_opt_checkpoint)
    assert values['adapter_training_prompt'] == "'a photo of'"


def test_caption_images_names_the_adapter_and_its_training_prompt(
        tmp_path, lively_opt_checkpoint, trained_adapter, capsys):
    cv2.imwrite(str(tmp_path / 'belt.png'), make_frame(2))
    status = caption_images.main(['--model', str(lively_opt_checkpoint), '--adapter',
                                  str(trained_adapter), '--max-new-tokens', '4',
                                  str(tmp_path / 'belt.png')])
    err = capsys.readouterr().err
    assert status == caption_images.EXIT_OK, err
    assert (f"caption_images: captioning with adapter '{trained_adapter}' on "
            f"'{lively_opt_checkpoint}' (trained with prompt 'a photo of')") in err
