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
A camera node that films the synthetic factory: frames, and the truth about each frame.

Per frame, all stamped with the same node-clock time:

- ``topic`` (sensor_msgs/Image, rgb8) and, with ``publish_compressed``, ``<topic>/compressed``
  (sensor_msgs/CompressedImage, JPEG), as a camera driver publishes them;
- ``caption_topic`` (std_msgs/String): the plain true caption, as an operator would narrate it
  during a recording; the bag converter reads it as caption text;
- ``truth_topic`` (std_msgs/String): JSON with the frame's stamp, frame_id, index and caption,
  so a listener can tell which frame a caption describes.

The truth topics are published before the image, so a listener has the truth by the time the
frame (or a caption of it) reaches it. Frame ``i`` is ``synthetic_factory.scene_at(seed, i)``,
so anyone can render the same picture again. With ``max_frames`` set, ``main`` returns once
that many frames are out.
"""

import array
import json
import sys
import threading

from blip2_ros.demo.synthetic_factory import COLOURS, COUNT_WORDS, KINDS, scene_at, SceneSpec
from blip2_ros.parameters import declare, ParameterSpec
import cv2
import rclpy
from rclpy.exceptions import InvalidTopicNameException, ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

RELIABILITY = {'best_effort': ReliabilityPolicy.BEST_EFFORT,
               'reliable': ReliabilityPolicy.RELIABLE}
# Reliable subscribers get the last frames only if the publisher is still there to resend them.
LINGER_SEC = 1.0
MAX_INT32 = 2 ** 31 - 1


class FactoryCameraError(ValueError):
    """A parameter value the camera cannot use; the message is one line."""


# The camera's parameters, declared from this one list; a README table can be generated from it.
PARAMETERS = (
    ParameterSpec('topic', '/camera/image_raw', 'Image topic (sensor_msgs/Image, rgb8); JPEG '
                  'frames go to <topic>/compressed.'),
    ParameterSpec('rate_hz', 10.0, 'Frames per second.', float_range=(0.1, 1000.0)),
    ParameterSpec('width', 640, 'Frame width in pixels.', integer_range=(16, 7680)),
    ParameterSpec('height', 480, 'Frame height in pixels.', integer_range=(16, 4320)),
    ParameterSpec('seed', 0, 'Scene stream: frame i is synthetic_factory.scene_at(seed, i).',
                  integer_range=(0, MAX_INT32)),
    ParameterSpec('frame_id', 'factory_camera', 'header.frame_id of every frame.'),
    ParameterSpec('publish_compressed', False, 'Also publish each frame as JPEG '
                  'sensor_msgs/CompressedImage on <topic>/compressed.'),
    ParameterSpec('jpeg_quality', 90, 'JPEG quality of the compressed frames.',
                  integer_range=(1, 100)),
    ParameterSpec('caption_topic', '/factory/true_caption', 'std_msgs/String with the plain '
                  'true caption of each frame, as an operator narrates; empty: off.'),
    ParameterSpec('truth_topic', '/factory/truth', 'std_msgs/String with JSON {stamp, '
                  'frame_id, index, seed, caption, count, colour, kind} per frame, to match '
                  'captions to frames; empty: off.'),
    ParameterSpec('reliability', 'reliable', 'QoS reliability of the image topics: reliable '
                  '(heard by every subscriber) or best_effort (sensor-data style).'),
    ParameterSpec('max_frames', 0, 'Stop after this many frames; 0: never stop.',
                  integer_range=(0, MAX_INT32)),
    ParameterSpec('wait_for_subscribers', 0, 'Hold the first frame until this many '
                  'subscribers are matched on the image topic, so a recorder or a demo started '
                  'alongside misses nothing; 0: start at once.', integer_range=(0, 1000)),
    ParameterSpec('counts', list(COUNT_WORDS), 'Item counts scenes draw from (subset of '
                  '1, 2, 3).'),
    ParameterSpec('colours', list(COLOURS), 'Item colours scenes draw from (subset of '
                  f'{", ".join(COLOURS)}).'),
    ParameterSpec('kinds', list(KINDS), f'Item kinds scenes draw from (subset of '
                  f'{", ".join(KINDS)}).'),
)


def image_message(frame, stamp, frame_id):
    """Build an rgb8 sensor_msgs/Image from an HxWx3 uint8 RGB array."""
    message = Image()
    message.header.stamp = stamp
    message.header.frame_id = frame_id
    message.height, message.width = int(frame.shape[0]), int(frame.shape[1])
    message.encoding = 'rgb8'
    message.is_bigendian = 0
    message.step = 3 * message.width
    # The generated setter copies an array.array('B') in one go; other types element by element.
    pixels = array.array('B')
    pixels.frombytes(frame.data)
    message.data = pixels
    return message


def compressed_message(frame, stamp, frame_id, quality):
    """Build a JPEG sensor_msgs/CompressedImage from an HxWx3 uint8 RGB array."""
    ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError('OpenCV could not encode a frame as JPEG')
    message = CompressedImage()
    message.header.stamp = stamp
    message.header.frame_id = frame_id
    # image_transport's format string: source encoding; codec, then what the codec holds.
    message.format = 'rgb8; jpeg compressed bgr8'
    pixels = array.array('B')
    pixels.frombytes(encoded.data)
    message.data = pixels
    return message


class FactoryCamera(Node):
    """Publish synthetic factory frames with their true captions at a fixed rate."""

    def __init__(self, **node_options):
        """Declare parameters, create publishers and start the frame timer."""
        super().__init__('factory_camera', **node_options)
        declare(self, PARAMETERS)
        value = self._value
        reliability = value('reliability')
        if reliability not in RELIABILITY:
            raise FactoryCameraError(
                f"reliability '{reliability}' is not one of: {', '.join(RELIABILITY)}")
        try:
            self.spec = SceneSpec(counts=tuple(value('counts')), colours=tuple(value('colours')),
                                  kinds=tuple(value('kinds')))
        except ValueError as error:
            raise FactoryCameraError(f'scene parameters: {error}') from error
        self.size = (value('height'), value('width'))
        self.seed = value('seed')
        self.frame_id = value('frame_id')
        self.max_frames = value('max_frames')
        self.jpeg_quality = value('jpeg_quality')
        self.wait_for_subscribers = value('wait_for_subscribers')
        self.frames_published = 0
        self.finished = threading.Event()

        image_qos = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                               reliability=RELIABILITY[reliability])
        truth_qos = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST,
                               reliability=ReliabilityPolicy.RELIABLE)
        topic = value('topic')
        self.image_publisher = self.create_publisher(Image, topic, image_qos)
        self.compressed_publisher = None
        if value('publish_compressed'):
            self.compressed_publisher = self.create_publisher(
                CompressedImage, topic.rstrip('/') + '/compressed', image_qos)
        self.caption_publisher = None
        if value('caption_topic'):
            self.caption_publisher = self.create_publisher(
                String, value('caption_topic'), truth_qos)
        self.truth_publisher = None
        if value('truth_topic'):
            self.truth_publisher = self.create_publisher(String, value('truth_topic'), truth_qos)
        self.timer = self.create_timer(1.0 / value('rate_hz'), self.publish_frame)
        self.get_logger().info(
            f'publishing {self.size[1]}x{self.size[0]} frames at {value("rate_hz")} Hz on '
            f'{topic} ({reliability}), seed {self.seed}, {self.spec.num_captions} possible '
            f'captions' + (f', {self.max_frames} frames' if self.max_frames else ''))

    def _value(self, name):
        return self.get_parameter(name).value

    def publish_frame(self):
        """Render the next scene and publish its truth, caption and image(s)."""
        if self.max_frames and self.frames_published >= self.max_frames:
            return
        if self.frames_published == 0 and self.wait_for_subscribers:
            matched = self.image_publisher.get_subscription_count()
            if matched < self.wait_for_subscribers:
                self.get_logger().info(
                    f'waiting for {self.wait_for_subscribers} subscriber(s) on '
                    f'{self.image_publisher.topic_name} ({matched} so far)',
                    throttle_duration_sec=5.0)
                return
        index = self.frames_published
        scene = scene_at(self.seed, index, self.size, self.spec)
        stamp = self.get_clock().now().to_msg()
        if self.truth_publisher is not None:
            truth = {'stamp': {'sec': stamp.sec, 'nanosec': stamp.nanosec},
                     'frame_id': self.frame_id, 'index': index, 'seed': self.seed,
                     'caption': scene.caption, **scene.attributes}
            self.truth_publisher.publish(String(data=json.dumps(truth, sort_keys=True)))
        if self.caption_publisher is not None:
            self.caption_publisher.publish(String(data=scene.caption))
        self.image_publisher.publish(image_message(scene.image, stamp, self.frame_id))
        if self.compressed_publisher is not None:
            self.compressed_publisher.publish(
                compressed_message(scene.image, stamp, self.frame_id, self.jpeg_quality))
        self.frames_published += 1
        if self.max_frames and self.frames_published >= self.max_frames:
            self.timer.cancel()
            self.get_logger().info(f'published {self.frames_published} frames; done')
            self.finished.set()


def main(args=None):
    """Run the factory camera until Ctrl-C, or until ``max_frames`` frames are out."""
    rclpy.init(args=args)
    node = None
    try:
        node = FactoryCamera()
        while rclpy.ok() and not node.finished.is_set():
            rclpy.spin_once(node, timeout_sec=0.1)
        if node.finished.is_set():
            end = node.get_clock().now().nanoseconds + int(LINGER_SEC * 1e9)
            while rclpy.ok() and node.get_clock().now().nanoseconds < end:
                rclpy.spin_once(node, timeout_sec=0.05)
    except (FactoryCameraError, ParameterException) as error:
        sys.exit(f'factory_camera: {" ".join(str(error).split())}')
    except InvalidTopicNameException as error:
        # rclpy's message spans three lines (reason, name, a caret under the bad character).
        reason_and_name = ' '.join(line.strip() for line in str(error).splitlines()[:2])
        sys.exit(f'factory_camera: {reason_and_name}; set topic, caption_topic and truth_topic '
                 'to names such as /camera/image_raw')
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
