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
Record synthetic factory footage straight into a rosbag2 bag, without running ROS.

The bag holds what ``ros2 bag record`` would capture from the ``factory_camera`` node with the
same parameters: sensor_msgs/Image rgb8 frames on ``/camera/image_raw`` (optionally JPEG
sensor_msgs/CompressedImage on ``/camera/image_raw/compressed``), the plain true caption as
std_msgs/String on ``/factory/true_caption`` and the JSON truth on ``/factory/truth``. Frame ``i``
is ``synthetic_factory.scene_at(seed, i)``, stamped and logged at ``start + i / rate``; its
caption and truth are logged just before it, as the camera publishes them first. The messages
are serialised with the rosbags type store for ROS 2 Jazzy (these three types are the same from
Humble to Kilted), so the bag feeds ``training.bag_to_coco`` like a real recording.

``--site line2`` records a second production line whose words the demo model never learned:
white and black items, captioned '<count> <colour> <kind> on the belt' (see :data:`SITES`).

Example::

    python -m training.record_synthetic_bag --out factory_bag --frames 2000 --size 64x64
"""

import argparse
from dataclasses import dataclass, field, replace
import json
import os
import shutil
import sys

from blip2_ros.demo.synthetic_factory import (CAPTION_SUFFIX, COLOURS, COUNT_WORDS,
                                              make_layout, parse_size, plural, render_layout,
                                              Scene, scene_at, SceneSpec)
import cv2
import numpy as np
from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores

STORAGE = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
# 2026-01-01T00:00:00Z: a fixed default start makes the same command write the same bag.
DEFAULT_START_SEC = 1767225600.0
# The camera publishes caption and truth right before the frame; a recorder logs them earlier.
CAPTION_LEAD_NS = 10_000
# What ros2 bag writes for an infinite QoS duration.
_INFINITE = QosTime(sec=9223372036, nsec=854775807)


class RecordError(RuntimeError):
    """A recording that cannot be made; the message is one line and says what to do."""


@dataclass(frozen=True)
class Site:
    """
    A production line of the synthetic factory: its item colours and its caption's ending.

    ``colours`` maps each colour word to the RGB its items are painted in. Scenes are drawn by
    ``synthetic_factory``; a site with colours of its own repaints them, keeping each item's
    brightness jitter, so the shapes, positions and counts come from the same draws.
    """

    name: str
    description: str
    colours: dict = field(default_factory=lambda: dict(COLOURS))
    suffix: str = CAPTION_SUFFIX


SITES = {site.name: site for site in (
    Site('line1', 'the conveyor the demo model was trained on: red, green, blue and yellow '
         'items, "... on the conveyor"'),
    # Words of the demo model's vocabulary that no caption of line1 uses, so its base model
    # has never been trained to say them.
    Site('line2', 'a second line: white and black items, "... on the belt"',
         colours={'white': (232, 232, 226), 'black': (30, 30, 33)}, suffix='on the belt'),
)}
DEFAULT_SITE = 'line1'


def site_colours(site, colours=None):
    """Return the colour words scenes of ``site`` draw from; raise ValueError on unknown ones."""
    colours = tuple(colours or site.colours)
    unknown = [colour for colour in colours if colour not in site.colours]
    if unknown or len(set(colours)) != len(colours) or len(colours) > len(COLOURS):
        raise ValueError(f'colours {list(colours)} must be distinct values from '
                         f'{", ".join(site.colours)} at site {site.name}')
    return colours


def site_scene_at(site, seed, index, size=(64, 64), spec=None, colours=None):
    """
    Return frame ``index`` of the stream ``seed`` at ``site`` (a :class:`Site` or its name).

    ``spec`` gives the counts and kinds (and at line1 the colours); ``colours`` picks among a
    site's own colours (default: all). Line1 is exactly ``synthetic_factory.scene_at``.
    """
    site = SITES[site] if isinstance(site, str) else site
    spec = spec or SceneSpec()
    if site.name == DEFAULT_SITE:
        return scene_at(seed, index, size, spec)
    colours = site_colours(site, colours)
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f'seed ({seed}) and index ({index}) must not be negative')
    # The site's colours stand in for as many of the factory's, drawn with the same chances.
    stand_ins = tuple(COLOURS)[:len(colours)]
    rng = np.random.default_rng([int(seed), int(index)])
    layout = make_layout(rng, replace(spec, colours=stand_ins))
    colour = colours[stand_ins.index(layout.colour)]
    painted = []
    for item in layout.items:
        # The stand-in's jitter as a brightness change: tinted whites and blacks read as colours.
        jitter = sum(item.rgb) / 3 - sum(COLOURS[layout.colour]) / 3
        painted.append(replace(item, rgb=tuple(int(np.clip(value + jitter, 0, 255))
                                               for value in site.colours[colour])))
    layout = replace(layout, colour=colour, items=tuple(painted))
    image, boxes = render_layout(layout, size, noise_rng=rng)
    caption = (f'{COUNT_WORDS[layout.count]} {colour} {plural(layout.kind, layout.count)} '
               f'{site.suffix}')
    return Scene(image=image, caption=caption, layout=layout, boxes=boxes)


def _qos(reliability, depth):
    """Return the QoS profile the factory camera offers, as ros2 bag stores it."""
    return Qos(history=QosHistory.KEEP_LAST, depth=depth, reliability=reliability,
               durability=QosDurability.VOLATILE, deadline=_INFINITE, lifespan=_INFINITE,
               liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=_INFINITE,
               avoid_ros_namespace_conventions=False)


def record_synthetic_bag(out, frames, rate_hz=10.0, size=(64, 64), seed=0, storage='sqlite3',
                         compressed=False, jpeg_quality=90, spec=None,
                         topic='/camera/image_raw', caption_topic='/factory/true_caption',
                         truth_topic='/factory/truth', frame_id='factory_camera',
                         start_sec=DEFAULT_START_SEC, reliability='reliable',
                         site=DEFAULT_SITE, colours=None):
    """
    Write ``frames`` synthetic frames into a new bag folder ``out``; return a summary dict.

    ``size`` is (height, width). Empty ``caption_topic`` or ``truth_topic`` leaves that topic
    out. ``site`` names one of :data:`SITES`; ``spec`` gives counts and kinds, and the colours
    at line1 (elsewhere ``colours``, default: the site's). Raises RecordError; a bag that fails
    half-way is removed.
    """
    spec = spec or SceneSpec()
    if site not in SITES:
        raise RecordError(f"site '{site}' is not one of: {', '.join(SITES)}")
    site = SITES[site]
    if site.name != DEFAULT_SITE:
        try:
            spec = replace(spec, colours=tuple(COLOURS)[:len(site_colours(site, colours))])
        except ValueError as error:
            raise RecordError(str(error)) from error
    if frames < 1:
        raise RecordError(f'--frames must be at least 1, not {frames}')
    if not 0 < rate_hz <= 1000:
        raise RecordError(f'--rate-hz must be above 0 and at most 1000, not {rate_hz}')
    if storage not in STORAGE:
        raise RecordError(f"storage '{storage}' is not one of: {', '.join(STORAGE)}")
    if os.path.exists(out):
        raise RecordError(f"'{out}' already exists: choose a new --out or delete it")
    if start_sec < 0:
        raise RecordError(f'--start-sec must not be negative, not {start_sec}')
    typestore = get_typestore(Stores.ROS2_JAZZY)
    image_type = typestore.types['sensor_msgs/msg/Image']
    compressed_type = typestore.types['sensor_msgs/msg/CompressedImage']
    string_type = typestore.types['std_msgs/msg/String']
    header_type = typestore.types['std_msgs/msg/Header']
    time_type = typestore.types['builtin_interfaces/msg/Time']
    image_reliability = (QosReliability.BEST_EFFORT if reliability == 'best_effort'
                         else QosReliability.RELIABLE)
    height, width = size
    start_ns = int(round(start_sec * 1e9))
    counts = {}
    captions = set()
    try:
        with Writer(out, version=9, storage_plugin=STORAGE[storage]) as writer:
            def connect(name, msgtype, qos):
                counts[name] = 0
                return writer.add_connection(name, msgtype, typestore=typestore,
                                             offered_qos_profiles=[qos])

            image_connection = connect(topic, image_type.__msgtype__, _qos(image_reliability, 5))
            compressed_topic = topic.rstrip('/') + '/compressed'
            compressed_connection = connect(
                compressed_topic, compressed_type.__msgtype__,
                _qos(image_reliability, 5)) if compressed else None
            caption_connection = connect(
                caption_topic, string_type.__msgtype__,
                _qos(QosReliability.RELIABLE, 50)) if caption_topic else None
            truth_connection = connect(
                truth_topic, string_type.__msgtype__,
                _qos(QosReliability.RELIABLE, 50)) if truth_topic else None

            def write(connection, name, time_ns, message):
                writer.write(connection, time_ns,
                             typestore.serialize_cdr(message, message.__msgtype__))
                counts[name] += 1

            for index in range(frames):
                scene = site_scene_at(site, seed, index, size, spec, colours)
                captions.add(scene.caption)
                stamp_ns = start_ns + int(round(index * 1e9 / rate_hz))
                stamp = time_type(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
                header = header_type(stamp=stamp, frame_id=frame_id)
                if truth_connection is not None:
                    truth = {'stamp': {'sec': stamp.sec, 'nanosec': stamp.nanosec},
                             'frame_id': frame_id, 'index': index, 'seed': seed,
                             'caption': scene.caption, **scene.attributes}
                    write(truth_connection, truth_topic, stamp_ns - CAPTION_LEAD_NS,
                          string_type(data=json.dumps(truth, sort_keys=True)))
                if caption_connection is not None:
                    write(caption_connection, caption_topic, stamp_ns - CAPTION_LEAD_NS,
                          string_type(data=scene.caption))
                write(image_connection, topic, stamp_ns, image_type(
                    header=header, height=height, width=width, encoding='rgb8',
                    is_bigendian=0, step=3 * width, data=scene.image.reshape(-1)))
                if compressed_connection is not None:
                    ok, encoded = cv2.imencode(
                        '.jpg', cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
                    if not ok:
                        raise RecordError('OpenCV could not encode a frame as JPEG')
                    write(compressed_connection, compressed_topic, stamp_ns, compressed_type(
                        header=header, format='rgb8; jpeg compressed bgr8',
                        data=np.frombuffer(encoded.tobytes(), dtype=np.uint8)))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {'bag': str(out), 'site': site.name, 'storage': storage, 'frames': frames,
            'rate_hz': rate_hz,
            'size': f'{width}x{height}', 'seed': seed, 'messages': counts,
            'distinct_captions': len(captions), 'possible_captions': spec.num_captions,
            'chance_level': spec.chance_level}


def _list(text, convert=str):
    return tuple(convert(part.strip()) for part in text.split(',') if part.strip())


def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description='Record synthetic factory footage into a rosbag2 bag (no ROS needed).')
    parser.add_argument('--out', required=True, help='new bag folder to create')
    parser.add_argument('--frames', type=int, required=True, help='number of frames')
    parser.add_argument('--rate-hz', type=float, default=10.0, help='frames per second of bag '
                        'time (default 10)')
    parser.add_argument('--size', default='64x64', help='frame size WIDTHxHEIGHT (default 64x64)')
    parser.add_argument('--seed', type=int, default=0, help='scene stream (default 0)')
    parser.add_argument('--storage', choices=tuple(STORAGE), default='sqlite3',
                        help='bag storage format (default sqlite3)')
    parser.add_argument('--compressed', action='store_true',
                        help='also write JPEG CompressedImage frames on <topic>/compressed')
    parser.add_argument('--jpeg-quality', type=int, default=90, choices=range(1, 101),
                        metavar='1..100', help='JPEG quality (default 90)')
    parser.add_argument('--topic', default='/camera/image_raw', help='image topic')
    parser.add_argument('--caption-topic', default='/factory/true_caption',
                        help="plain caption String topic ('' leaves it out)")
    parser.add_argument('--truth-topic', default='/factory/truth',
                        help="JSON truth String topic ('' leaves it out)")
    parser.add_argument('--frame-id', default='factory_camera', help='header.frame_id')
    parser.add_argument('--start-sec', type=float, default=DEFAULT_START_SEC,
                        help='bag time of the first frame in seconds since the epoch '
                        '(default 2026-01-01T00:00:00Z)')
    parser.add_argument('--site', choices=tuple(SITES), default=DEFAULT_SITE,
                        help='production line: ' + '; '.join(
                            f'{site.name}: {site.description}' for site in SITES.values())
                        + f' (default {DEFAULT_SITE})')
    parser.add_argument('--counts', default='1,2,3', help='item counts scenes draw from')
    parser.add_argument('--colours', default='',
                        help="item colours scenes draw from (default: all of the site's, "
                        'red,green,blue,yellow at line1)')
    parser.add_argument('--kinds', default='box,gear,bottle,bolt',
                        help='item kinds scenes draw from')
    return parser.parse_args(argv)


def main(argv=None):
    """Record the bag and print a one-line summary; return the exit code."""
    args = parse_args(argv)
    try:
        if args.seed < 0:
            raise RecordError(f'--seed must not be negative, not {args.seed}')
        try:
            size = parse_size(args.size)
            colours = _list(args.colours)
            site = SITES[args.site]
            if site.name == DEFAULT_SITE:
                spec = SceneSpec(counts=_list(args.counts, int),
                                 colours=colours or tuple(site.colours),
                                 kinds=_list(args.kinds))
            else:
                spec = SceneSpec(counts=_list(args.counts, int), kinds=_list(args.kinds))
        except ValueError as error:
            raise RecordError(str(error)) from error
        summary = record_synthetic_bag(
            args.out, args.frames, args.rate_hz, size, args.seed, args.storage,
            args.compressed, args.jpeg_quality, spec, args.topic, args.caption_topic,
            args.truth_topic, args.frame_id, args.start_sec, site=args.site,
            colours=colours or None)
    except RecordError as error:
        print(f'record_synthetic_bag: {error}', file=sys.stderr)
        return 1
    topics = ', '.join(f'{name} {count}' for name, count in summary['messages'].items())
    print(f"wrote {summary['frames']} frames of {summary['size']} at {summary['rate_hz']:g} Hz "
          f"(site {summary['site']}, seed {summary['seed']}) to {summary['bag']} "
          f"[{summary['storage']}]: {topics}; "
          f"{summary['distinct_captions']} of {summary['possible_captions']} possible captions "
          f"appear, chance level {summary['chance_level']:.1%}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
