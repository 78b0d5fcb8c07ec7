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

"""The factory camera node over real rclpy and Fast DDS on localhost."""

import json
import os
import subprocess
import sys
import time

from blip2_ros.demo.factory_camera import FactoryCamera, FactoryCameraError, PARAMETERS
from blip2_ros.demo.synthetic_factory import scene_at
import cv2
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

pytestmark = pytest.mark.ros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30.0


@pytest.fixture
def context():
    """Give the test a ROS context of its own and shut it down afterwards."""
    ros_context = rclpy.Context()
    rclpy.init(context=ros_context)
    yield ros_context
    rclpy.try_shutdown(context=ros_context)


class Listener:
    """A node that records everything the factory camera publishes."""

    def __init__(self, context, reliability=ReliabilityPolicy.RELIABLE, topic='/camera/image_raw'):
        self.node = rclpy.create_node('factory_listener', context=context)
        self.images, self.jpegs, self.captions, self.truths = [], [], [], []
        image_qos = QoSProfile(depth=100, reliability=reliability)
        text_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Image, topic, self.images.append, image_qos)
        self.node.create_subscription(CompressedImage, topic + '/compressed', self.jpegs.append,
                                      image_qos)
        self.node.create_subscription(String, '/factory/true_caption',
                                      lambda message: self.captions.append(message.data),
                                      text_qos)
        self.node.create_subscription(String, '/factory/truth',
                                      lambda message: self.truths.append(
                                          json.loads(message.data)), text_qos)


def spin_until(executor, condition, timeout=TIMEOUT, what='condition'):
    """Spin ``executor`` until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out after {timeout:.0f} s waiting for {what}')
        executor.spin_once(timeout_sec=0.05)


def stamp_key(stamp):
    """Return a stamp (message or truth JSON) as one hashable pair."""
    if isinstance(stamp, dict):
        return stamp['sec'], stamp['nanosec']
    return stamp.sec, stamp.nanosec


def camera_process(*parameters):
    """Start ``python -m blip2_ros.demo.factory_camera`` with ``-p`` parameters."""
    command = [sys.executable, '-m', 'blip2_ros.demo.factory_camera', '--ros-args']
    for parameter in parameters:
        command += ['-p', parameter]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_camera_process_publishes_frames_with_matching_truth(context):
    listener = Listener(context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(listener.node)
    frames, seed = 30, 5
    process = camera_process('rate_hz:=20.0', 'width:=64', 'height:=48', f'seed:={seed}',
                             f'max_frames:={frames}', 'publish_compressed:=true',
                             'frame_id:=line_3_camera', 'reliability:=reliable',
                             'wait_for_subscribers:=1')
    try:
        # The node stops by itself after max_frames; a reliable subscriber then has them all.
        spin_until(executor, lambda: process.poll() is not None, what='the camera to finish')
        executor.spin_once(timeout_sec=0.2)
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=10)
    listener.node.destroy_node()
    assert process.returncode == 0, stderr
    assert 'Traceback' not in stderr
    # The camera waited for the image subscription, so no frame is lost; the other topics of
    # the listener are matched in the same discovery exchange, give or take a frame.
    assert len(listener.images) == frames
    truths = {stamp_key(truth['stamp']): truth for truth in listener.truths}
    matched = [image for image in listener.images if stamp_key(image.header.stamp) in truths]
    assert len(matched) >= frames - 2
    indices = []
    for image in matched:
        truth = truths[stamp_key(image.header.stamp)]
        scene = scene_at(seed, truth['index'], (48, 64))
        assert (image.height, image.width, image.encoding, image.step) == (48, 64, 'rgb8', 192)
        assert image.header.frame_id == truth['frame_id'] == 'line_3_camera'
        assert np.array_equal(np.frombuffer(image.data, np.uint8).reshape(48, 64, 3),
                              scene.image)
        assert truth['caption'] == scene.caption
        assert {key: truth[key] for key in ('count', 'colour', 'kind')} == scene.attributes
        indices.append(truth['index'])
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert indices[-1] == frames - 1, 'the last frame is index max_frames - 1'
    # The plain caption topic narrates the same frames in the same order.
    truth_captions = [truth['caption'] for truth in listener.truths]
    assert listener.captions[-len(indices):] == truth_captions[-len(indices):]
    jpeg_stamps = {stamp_key(jpeg.header.stamp): jpeg for jpeg in listener.jpegs
                   if stamp_key(jpeg.header.stamp) in truths}
    assert len(jpeg_stamps) >= frames - 2
    scenes = {key: scene_at(seed, truth['index'], (48, 64)).image
              for key, truth in truths.items()}
    for key, jpeg in jpeg_stamps.items():
        assert jpeg.format == 'rgb8; jpeg compressed bgr8'
        decoded = cv2.imdecode(np.frombuffer(jpeg.data, np.uint8), cv2.IMREAD_COLOR)
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(int)
        # JPEG is lossy: the frame it shows is the one closest to it, and close it is.
        distances = {other: np.abs(decoded - image).mean() for other, image in scenes.items()}
        assert min(distances, key=distances.get) == key and distances[key] < 10


def listen_to_camera(context, overrides, listener, condition, what, check_graph=None):
    """Run a FactoryCamera with ``overrides`` beside ``listener`` until ``condition()``."""
    camera = FactoryCamera(context=context, parameter_overrides=overrides)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(camera)
    executor.add_node(listener.node)
    try:
        spin_until(executor, condition, what=what)
        if check_graph:
            check_graph(listener.node)
    finally:
        executor.shutdown()
        camera.destroy_node()
        listener.node.destroy_node()
    return camera


def test_best_effort_camera_with_a_narrow_scene_spec(context):
    listener = Listener(context, ReliabilityPolicy.BEST_EFFORT, topic='/line_2/image')

    def check_graph(node):
        offered = node.get_publishers_info_by_topic('/line_2/image')
        assert [info.qos_profile.reliability for info in offered] == [
            ReliabilityPolicy.BEST_EFFORT]
        # An empty caption_topic turns the plain caption off; the truth topic stays.
        assert node.count_publishers('/factory/true_caption') == 0
        assert node.count_publishers('/line_2/image/compressed') == 0

    camera = listen_to_camera(context, [
        Parameter('reliability', value='best_effort'), Parameter('rate_hz', value=50.0),
        Parameter('width', value=32), Parameter('height', value=24),
        Parameter('topic', value='/line_2/image'), Parameter('caption_topic', value=''),
        Parameter('kinds', value=['gear']), Parameter('colours', value=['blue', 'red']),
        Parameter('seed', value=12)], listener,
        lambda: len(listener.images) >= 10 and len(listener.truths) >= 10,
        what='10 best-effort frames', check_graph=check_graph)
    assert listener.captions == [] and listener.jpegs == []
    assert {truth['kind'] for truth in listener.truths} == {'gear'}
    assert {truth['colour'] for truth in listener.truths} <= {'blue', 'red'}
    truths = {stamp_key(truth['stamp']): truth for truth in listener.truths}
    matched = [image for image in listener.images if stamp_key(image.header.stamp) in truths]
    assert len(matched) >= 5
    for image in matched:
        truth = truths[stamp_key(image.header.stamp)]
        assert (image.height, image.width) == (24, 32)
        assert np.array_equal(np.frombuffer(image.data, np.uint8).reshape(24, 32, 3),
                              scene_at(12, truth['index'], (24, 32), camera.spec).image)


def test_jpeg_frames_are_encoded_at_the_jpeg_quality_asked_for(context):
    listener = Listener(context)
    listen_to_camera(context, [
        Parameter('publish_compressed', value=True), Parameter('jpeg_quality', value=20),
        Parameter('rate_hz', value=50.0), Parameter('width', value=64),
        Parameter('height', value=48), Parameter('seed', value=3)], listener,
        lambda: len(listener.jpegs) >= 3 and len(listener.truths) >= 3, what='3 JPEG frames')
    truths = {stamp_key(truth['stamp']): truth for truth in listener.truths}
    matched = [jpeg for jpeg in listener.jpegs if stamp_key(jpeg.header.stamp) in truths]
    assert len(matched) >= 2
    for jpeg in matched:
        scene = scene_at(3, truths[stamp_key(jpeg.header.stamp)]['index'], (48, 64))
        ok, expected = cv2.imencode('.jpg', cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 20])
        assert ok and bytes(jpeg.data) == expected.tobytes()


def test_parameters_are_declared_from_one_list_and_bad_values_refused(context):
    camera = FactoryCamera(context=context)
    try:
        for spec in PARAMETERS:
            assert camera.get_parameter(spec.name).value == spec.default, spec.name
            descriptor = camera.describe_parameter(spec.name)
            assert descriptor.description == spec.description and descriptor.read_only
        assert camera.describe_parameter('rate_hz').floating_point_range[0].from_value == 0.1
    finally:
        camera.destroy_node()
    for overrides, message in (([Parameter('reliability', value='sometimes')], 'reliability'),
                               ([Parameter('kinds', value=['box', 'cat'])], 'kinds')):
        with pytest.raises(FactoryCameraError, match=message):
            FactoryCamera(context=context, parameter_overrides=overrides)
    process = camera_process('reliability:=sometimes')
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0
    assert stderr.strip().splitlines() == [
        "factory_camera: reliability 'sometimes' is not one of: best_effort, reliable"]


@pytest.mark.parametrize('topic, reason', [
    ("''", 'topic name must not be empty string'),
    ('/', 'topic name must not end with a forward slash')])
def test_an_invalid_topic_name_is_one_line_and_exit_1(topic, reason):
    process = camera_process(f'topic:={topic}')
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f'factory_camera: Invalid topic name: {reason}: ')
    assert lines[0].endswith('to names such as /camera/image_raw')
