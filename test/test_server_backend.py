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

"""The openai backend against a real vLLM server: the node, the folder CLI and their faults."""

import json
import os
import signal
import threading
import time

from blip2_ros import caption_images
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, make_captioner, ModelLoadError
from blip2_ros.server_captioner import CaptionFailure, png_data_url
import cv2
from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import pytest
from ros_harness import Harness, image_message, wait_for
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger
from vllm_server import API_KEY, API_KEY_ENV

pytestmark = pytest.mark.ros

SERVER_TIMEOUT = 60.0


def make_frame(seed, height=64, width=64):
    """Return a random, reproducible RGB frame (the tiny model's input size by default)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def local_captioner(vllm_server):
    """Load the checkpoint the server serves with the local backend: the captions to expect."""
    return Blip2Captioner(CaptionerConfig(model=str(vllm_server.checkpoint), device='cpu',
                                          dtype='float32', max_new_tokens=8))


@pytest.fixture
def api_key(monkeypatch):
    """Put the server's API key where api_key_env points."""
    monkeypatch.setenv(API_KEY_ENV, API_KEY)


@pytest.fixture
def server_harness(vllm_server, api_key):
    """Make caption nodes with the openai backend pointed at the test server."""
    harnesses = []

    def make(topics, **parameters):
        settings = {'backend': 'openai', 'server_url': vllm_server.base_url,
                    'api_key_env': API_KEY_ENV, 'server_image_size': 64, 'max_new_tokens': 8}
        settings.update(parameters)
        model = settings.pop('model', vllm_server.model_name)
        harness = Harness(model, topics, **settings)
        harnesses.append(harness)
        return harness
    yield make
    for harness in harnesses:
        if not getattr(harness, 'closed', False):
            harness.close()


def server_config(vllm_server, **overrides):
    """Return a CaptionerConfig for the test server."""
    settings = {'backend': 'openai', 'model': vllm_server.model_name,
                'server_url': vllm_server.base_url, 'api_key_env': API_KEY_ENV,
                'server_image_size': 64, 'max_new_tokens': 8}
    settings.update(overrides)
    return CaptionerConfig(**settings)


def last_diagnostic(harness):
    """Return (level, message, values) of the newest diagnostics status."""
    status = harness.diagnostics[-1].status[0]
    return status.level, status.message, {value.key: value.value for value in status.values}


class RequestSpy:
    """Count and time the chat requests a server captioner sends (the real ones still go out)."""

    def __init__(self, captioner, hold_until=None):
        """Wrap the captioner's client method; hold requests until `hold_until()` is true."""
        self.calls = []
        self.inside = 0  # requests in the method now, held or sent
        self._lock = threading.Lock()
        completions = captioner.client.chat.completions
        original = completions.create

        def create(*args, **kwargs):
            started = time.monotonic()
            with self._lock:
                self.inside += 1
            try:
                if hold_until is not None:
                    wait_for(hold_until, timeout=SERVER_TIMEOUT, what='the frames to arrive')
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.inside -= 1
                    self.calls.append((started, time.monotonic()))
        completions.create = create

    def most_in_flight(self):
        """Return the most requests that were in flight at the same moment."""
        events = sorted([(start, 1) for start, _ in self.calls]
                        + [(end, -1) for _, end in self.calls])
        in_flight = most = 0
        for _, step in events:
            in_flight += step
            most = max(most, in_flight)
        return most


def test_server_captions_equal_the_local_backend_with_and_without_prompt(
        vllm_server, local_captioner, api_key):
    captioner = make_captioner(server_config(vllm_server))
    assert captioner.check() is None
    frames = [make_frame(seed) for seed in range(6)]
    # Frames of another size are resized on the robot exactly as the local backend resizes.
    frames += [make_frame(10, 120, 160), make_frame(11, 480, 640)]
    for prompt in ('', 'a photo of'):
        expected = local_captioner.caption(frames, prompt=prompt)
        assert len(set(expected)) > 3, 'the test model must caption different frames apart'
        assert captioner.caption(frames, prompt=prompt) == expected
    captioner.close()


def test_a_lora_training_output_serves_with_the_captions_of_base_and_adapter(
        vllm_server, api_key):
    # The server serves training.export_merged's folder; the robot's local backend would
    # load the training run's adapter on its base instead.
    adapter_captioner = Blip2Captioner(CaptionerConfig(
        model=str(vllm_server.base_checkpoint), adapter=str(vllm_server.adapter),
        device='cpu', dtype='float32', max_new_tokens=8))
    base_captioner = Blip2Captioner(CaptionerConfig(
        model=str(vllm_server.base_checkpoint), device='cpu', dtype='float32',
        max_new_tokens=8))
    frames = [make_frame(seed) for seed in range(80, 86)]
    expected = adapter_captioner.caption(frames)
    assert expected != base_captioner.caption(frames), 'the adapter must change captions'
    captioner = make_captioner(server_config(vllm_server))
    assert captioner.caption(frames) == expected
    captioner.close()


def test_a_frame_is_sent_as_a_lossless_png_of_the_model_input_size():
    frame = make_frame(3, 1080, 1920)
    url = png_data_url(frame, (224, 224))
    import base64
    png = base64.b64decode(url.split(',', 1)[1])
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert decoded.shape == (224, 224, 3)
    # Noise is the worst case for PNG; a real 1080p frame costs far less than 6 MB raw.
    assert len(url) < 250_000
    import torch
    from blip2_ros.preprocess import resize_like_pil
    expected = resize_like_pil(torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0),
                               (224, 224), 'bicubic')[0].permute(1, 2, 0).numpy()
    assert np.array_equal(decoded, expected)


def test_the_node_captions_through_the_server_with_stamps_and_several_requests_in_flight(
        server_harness, local_captioner, vllm_server):
    topics = [f'/cam_{index}/image_raw' for index in range(4)]
    harness = server_harness(topics, max_batch_size=4)
    all_in = []

    def together():
        # The first round waits until every camera's frame is in, however slowly they come on
        # a busy machine, so some round holds at least two of the four. A round's requests then
        # wait for each other (a round of one goes after 2 s), so that a busy machine that runs
        # the captioner's threads one after another cannot make them look sequential; a
        # captioner that sends them one at a time never has two inside.
        if sum(camera.received for camera in harness.node.cameras.values()) < len(topics):
            return False
        all_in[:] = all_in or [time.monotonic()]
        return spy.inside >= 2 or time.monotonic() - all_in[0] > 2.0

    spy = RequestSpy(harness.node.captioner, hold_until=together)
    publishers = [harness.publisher(Image, topic) for topic in topics]
    frames = [make_frame(20 + index) for index in range(4)]
    for index, (publisher, frame) in enumerate(zip(publishers, frames)):
        publisher.publish(image_message(frame, stamp_sec=100 + index, frame_id=f'f{index}'))
    infos = harness.wait_for_infos(4, timeout=SERVER_TIMEOUT)
    expected = dict(zip(topics, local_captioner.caption(frames)))
    for info in infos:
        index = topics.index(info['source_topic'])
        assert info['caption'] == expected[info['source_topic']]
        assert info['stamp'] == {'sec': 100 + index, 'nanosec': 500}
        assert info['frame_id'] == f'f{index}'
        assert info['backend'] == 'openai' and info['server'] == vllm_server.base_url
        assert info['model'] == vllm_server.model_name
    # The frames of one round were requests in flight together, for the server to batch.
    assert spy.most_in_flight() >= 2
    wait_for(lambda: harness.diagnostics and last_diagnostic(harness)[2].get('backend') ==
             'openai', what='diagnostics')
    level, message, values = last_diagnostic(harness)
    assert values['device'] == vllm_server.base_url
    # The key itself is never shown: not in a parameter, a diagnostic or the caption info.
    everything = json.dumps([values, message, infos, [
        parameter.value for parameter in harness.node._parameters.values()]], default=str)
    assert API_KEY not in everything


def test_a_wrong_model_name_is_one_error_without_a_retry_storm(server_harness, vllm_server):
    harness = server_harness(['/cam/image_raw'], model='no-such-model')
    spy = RequestSpy(harness.node.captioner)
    publisher = harness.publisher(Image, '/cam/image_raw')
    wait_for(lambda: harness.diagnostics and 'no-such-model' in last_diagnostic(harness)[1],
             timeout=SERVER_TIMEOUT, what='a diagnostic naming the model')
    level, message, values = last_diagnostic(harness)
    assert level == DiagnosticStatus.ERROR
    assert vllm_server.base_url in message and vllm_server.model_name in message
    for index in range(40):  # 2 s of frames at 20 Hz
        publisher.publish(image_message(make_frame(index), stamp_sec=index))
        time.sleep(0.05)
    wait_for(lambda: harness.node.statistics()['dropped_by_reason'].get(
        'server_wrong_model', 0) > 0, what='dropped frames')
    # Backoff: a handful of requests in 2 s, not one per frame.
    assert len(spy.calls) <= 3
    assert harness.captions == []


def test_a_wrong_key_is_named_in_one_error(server_harness, monkeypatch, vllm_server):
    monkeypatch.setenv('BLIP2_TEST_WRONG_KEY', 'not-the-key')
    harness = server_harness(['/cam/image_raw'], api_key_env='BLIP2_TEST_WRONG_KEY')
    wait_for(lambda: harness.diagnostics and 'API key' in last_diagnostic(harness)[1],
             timeout=SERVER_TIMEOUT, what='a diagnostic about the key')
    level, message, _ = last_diagnostic(harness)
    assert level == DiagnosticStatus.ERROR and 'BLIP2_TEST_WRONG_KEY' in message
    assert 'not-the-key' not in message


def test_a_missing_key_variable_stops_the_node_in_one_line(vllm_server, monkeypatch):
    monkeypatch.delenv('BLIP2_TEST_UNSET_KEY', raising=False)
    with pytest.raises(ModelLoadError, match='BLIP2_TEST_UNSET_KEY'):
        make_captioner(server_config(vllm_server, api_key_env='BLIP2_TEST_UNSET_KEY'))


def test_a_frozen_server_times_requests_out_and_the_node_goes_on(
        server_harness, vllm_server, local_captioner):
    harness = server_harness(['/cam/image_raw'], request_timeout=0.5)
    publisher = harness.publisher(Image, '/cam/image_raw')
    publisher.publish(image_message(make_frame(30), stamp_sec=1))
    harness.wait_for_infos(1, timeout=SERVER_TIMEOUT)
    # Frozen, not stopped: connections are accepted and never answered.
    os.killpg(vllm_server.process.pid, signal.SIGSTOP)
    try:
        for index in range(10):
            publisher.publish(image_message(make_frame(31 + index), stamp_sec=10 + index))
            time.sleep(0.1)
        wait_for(lambda: harness.node.statistics()['dropped_by_reason'].get(
            'server_timeout', 0) >= 1, what='a timed-out frame')
        # Newest frame wins: every frame was captioned, replaced by a newer one or dropped,
        # except at most the one in flight and the one waiting: no backlog builds up.
        stats = harness.node.statistics()
        camera = stats['cameras']['/cam/image_raw']
        outstanding = (camera['received'] - stats['captions_published'] - camera['replaced']
                       - camera['dropped'])
        assert camera['received'] == 11 and 0 <= outstanding <= 2, (camera, stats)
    finally:
        os.killpg(vllm_server.process.pid, signal.SIGCONT)
    publisher.publish(image_message(make_frame(50), stamp_sec=50))
    wait_for(lambda: any(info['stamp']['sec'] == 50 for info in harness.infos),
             timeout=SERVER_TIMEOUT, what='a caption after the server woke up')
    caption = next(info for info in harness.infos if info['stamp']['sec'] == 50)['caption']
    assert caption == local_captioner.caption([make_frame(50)])[0]


def publish_until(harness, publisher, condition, what, timeout, first_stamp):
    """Publish a new frame every 0.2 s until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    stamp = first_stamp
    while not condition():
        assert time.monotonic() < deadline, f'timed out after {timeout} s waiting for {what}'
        publisher.publish(image_message(make_frame(stamp), stamp_sec=stamp))
        stamp += 1
        time.sleep(0.2)


def test_a_stopped_server_is_reported_and_a_node_started_without_it_captions_once_it_is_up(
        server_harness, vllm_server):
    running = server_harness(['/cam/image_raw'])
    publisher = running.publisher(Image, '/cam/image_raw')
    publisher.publish(image_message(make_frame(60), stamp_sec=60))
    running.wait_for_infos(1, timeout=SERVER_TIMEOUT)
    vllm_server.stop()
    try:
        # Stopped mid-run: frames are dropped and counted, diagnostics name the server.
        publish_until(running, publisher, lambda: running.diagnostics and 'cannot reach' in
                      last_diagnostic(running)[1], 'an unreachable-server diagnostic', 30, 61)
        level, message, values = last_diagnostic(running)
        assert level == DiagnosticStatus.ERROR and vllm_server.base_url in message
        assert int(values['dropped_server_unreachable']) >= 1
        # caption_now answers with the reason instead of waiting.
        response = running.call(Trigger, '/blip2_caption/caption_now', Trigger.Request())
        assert not response.success and 'cannot reach' in response.message
        running.close()
        running.closed = True
        # A node started while the server is down starts anyway and says so.
        waiting = server_harness(['/cam/image_raw'])
        wait_for(lambda: waiting.diagnostics and 'cannot reach' in last_diagnostic(waiting)[1],
                 what='the new node to say the server is not there')
        assert waiting.node.statistics()['inference_thread_alive']
    finally:
        vllm_server.start()
    publisher = waiting.publisher(Image, '/cam/image_raw')
    publish_until(waiting, publisher, lambda: waiting.infos, 'a caption once the server is up',
                  SERVER_TIMEOUT, 100)
    wait_for(lambda: 'cannot reach' not in last_diagnostic(waiting)[1],
             what='the error to clear')


def test_caption_images_through_the_server(vllm_server, local_captioner, api_key, tmp_path,
                                           capsys):
    frames = {f'{index}.png': make_frame(70 + index) for index in range(3)}
    for name, frame in frames.items():
        cv2.imwrite(str(tmp_path / name), frame[:, :, ::-1])
    arguments = ['--backend', 'openai', '--server-url', vllm_server.base_url, '--model',
                 vllm_server.model_name, '--api-key-env', API_KEY_ENV, '--server-image-size',
                 '64', '--max-new-tokens', '8', str(tmp_path)]
    assert caption_images.main(arguments) == caption_images.EXIT_OK
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = local_captioner.caption(list(frames.values()))
    assert [line['caption'] for line in lines] == expected

    wrong = list(arguments)
    wrong[wrong.index(vllm_server.model_name)] = 'no-such-model'
    assert caption_images.main(wrong) == caption_images.EXIT_MODEL_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'no-such-model' in error[0] and 'Traceback' not in error[0]


def test_caption_images_with_no_server_says_so_in_one_line(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / 'a.png'), make_frame(1))
    # A port nothing listens on.
    import socket
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    status = caption_images.main(['--backend', 'openai', '--server-url',
                                  f'http://127.0.0.1:{port}/v1', '--model', 'm', str(tmp_path)])
    assert status == caption_images.EXIT_MODEL_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and 'cannot reach' in error[0] and str(port) in error[0]


def test_a_failure_is_a_caption_failure_and_not_an_exception_for_the_batch(
        vllm_server, api_key):
    captioner = make_captioner(server_config(vllm_server, model='no-such-model'))
    results = captioner.caption([make_frame(1), make_frame(2)])
    assert all(isinstance(result, CaptionFailure) for result in results)
    assert results[0].reason == 'server_wrong_model' and results[0].lasting
    captioner.close()
