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
What the ROS tests share: camera messages, waiting, and a caption node with a peer to talk to.

``Harness`` runs a real CaptionNode and a test node in one process, in a private rclpy context;
DDS on localhost carries the traffic between them. The ``harness_factory`` fixture in
conftest.py makes them and closes them after the test.
"""

import array
import json
import threading
import time

from blip2_ros.caption_node import CaptionNode
from blip2_ros.captioner import ModelLoadError
import cv2
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

TIMEOUT = 20.0


def make_frame(seed, height=48, width=64):
    """Return a random but reproducible RGB frame; different seeds give different captions."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_message(frame, stamp_sec=0, frame_id='camera', encoding='rgb8', stamp_nanosec=500):
    """Build a sensor_msgs/Image from an RGB frame, the way a camera driver would."""
    message = Image()
    message.header.stamp.sec = stamp_sec
    message.header.stamp.nanosec = stamp_nanosec
    message.header.frame_id = frame_id
    message.height, message.width = frame.shape[:2]
    message.encoding = encoding
    pixels = frame if encoding == 'rgb8' else cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    message.step = frame.shape[1] * 3
    message.data = array.array('B', pixels.tobytes())
    return message


def jpeg_message(frame, stamp_sec=0, frame_id='camera'):
    """Build a sensor_msgs/CompressedImage holding ``frame`` as a JPEG."""
    message = CompressedImage()
    message.header.stamp.sec = stamp_sec
    message.header.frame_id = frame_id
    message.format = 'rgb8; jpeg compressed bgr8'
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    message.data = array.array('B', encoded.tobytes())
    return message


def decode_jpeg(message):
    """Decode a CompressedImage the way a receiver would, to know what the node saw."""
    bgr = cv2.imdecode(np.frombuffer(bytes(message.data), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def wait_for(condition, timeout=TIMEOUT, what='condition'):
    """Poll ``condition`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f'timed out after {timeout} s waiting for {what}')


def wait_until_active(node, timeout=TIMEOUT * 12):
    """
    Wait for an autostarting node to be active; raise ModelLoadError if it cannot start.

    The limit is generous: a first torch.compile on two busy cores takes minutes, and a start
    that fails ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    while node.lifecycle_state != 'active':
        if node.finished.done():
            raise ModelLoadError(node.configure_error)
        assert time.monotonic() < deadline, f'still {node.lifecycle_state} after {timeout} s'
        time.sleep(0.02)


class Harness:
    """A caption node and a test node (publishers, listeners, clients) spinning in one process."""

    def __init__(self, checkpoint, topics, namespace='', **parameters):
        """Start both nodes in a private context; DDS carries the traffic between them."""
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = self.peer = self.executor = None
        try:
            self._start(checkpoint, topics, namespace, parameters)
        except BaseException:
            # A node left spinning would answer the next test's calls under the same name.
            self.close()
            raise

    def _start(self, checkpoint, topics, namespace, parameters):
        overrides = [Parameter('model', value=str(checkpoint)),
                     Parameter('image_topics', value=list(topics)),
                     Parameter('diagnostics_period', value=0.2)]
        overrides += [Parameter(name, value=value) for name, value in parameters.items()]
        self.node = CaptionNode(context=self.context, parameter_overrides=overrides,
                                namespace=namespace)
        self.peer = rclpy.create_node('test_peer', context=self.context)
        self.captions, self.infos, self.diagnostics = [], [], []
        self.peer.create_subscription(
            String, '/blip2/caption', lambda message: self.captions.append(message.data), 10)
        self.peer.create_subscription(
            String, '/blip2/caption_info',
            lambda message: self.infos.append(json.loads(message.data)), 10)
        self.peer.create_subscription(
            DiagnosticArray, '/diagnostics', self.diagnostics.append, 10)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        if parameters.get('autostart', True):
            # autostart loads the model in the background; the tests begin with it captioning.
            wait_until_active(self.node)

    def publisher(self, message_type, topic, reliability=ReliabilityPolicy.RELIABLE):
        """Create a publisher and wait until the caption node's subscription has matched it."""
        publisher = self.peer.create_publisher(
            message_type, topic, QoSProfile(depth=10, reliability=reliability))
        wait_for(lambda: publisher.get_subscription_count() > 0, what=f'a subscriber on {topic}')
        wait_for(lambda: self.peer.count_publishers('/blip2/caption_info') > 0,
                 what='the caption publisher')
        return publisher

    def call(self, service_type, name, request):
        """Call a service of the caption node and return its response."""
        client = self.peer.create_client(service_type, name)
        assert client.wait_for_service(timeout_sec=TIMEOUT), f'{name} did not appear'
        future = client.call_async(request)
        wait_for(future.done, what=f'a response from {name}')
        return future.result()

    def wait_for_infos(self, count, timeout=TIMEOUT):
        """Wait for ``count`` companion messages and return them."""
        wait_for(lambda: len(self.infos) >= count, timeout, f'{count} captions')
        return self.infos[:count]

    def close(self):
        """Stop spinning and tear everything down, however far the start got."""
        try:
            if self.executor is not None:
                self.executor.shutdown()
        finally:
            for node in (self.node, self.peer):
                if node is not None:
                    node.destroy_node()
            rclpy.try_shutdown(context=self.context)


def statuses(harness):
    """Return every captioning status the test node has heard on /diagnostics so far."""
    return [status for message in list(harness.diagnostics) for status in message.status]
