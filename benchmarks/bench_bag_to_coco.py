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
Frames per second of bag_to_coco against reading and decoding the same bag with rosbags alone.

From the repository root:
``python -m benchmarks.bench_bag_to_coco [--frames 120] [--json /tmp/bench_bag_to_coco.json]``

Writes a rosbag2 bag (sqlite3 or mcap) with a raw rgb8 camera and a JPEG camera, then, in this
one process and alternating the order, times:

* reader alone: ``rosbags.rosbag2.Reader`` + CDR deserialization + ``message_to_rgb`` for every
  frame of a topic (the least any converter has to do);
* converter: ``training.bag_to_coco.convert_bags`` on that topic into a fresh folder, which adds
  selection, encoding raw frames (JPEG q95 or PNG; JPEG frames are stored as recorded), writing
  files and annotations.json.

Each number is the best of ``--repeats`` runs. Prints a table and writes the results as JSON.
"""

import argparse
import json
import os
from pathlib import Path
import platform
import shutil
import sys
import tempfile
import time

from blip2_ros.image_conversion import message_to_rgb
import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from training.bag_to_coco import ConversionOptions, convert_bags

TYPES = get_typestore(Stores.ROS2_KILTED)
RAW_TOPIC = '/camera/image_raw'
JPEG_TOPIC = '/camera/image_raw/compressed'


def _scene(index, width, height):
    """Draw a smooth synthetic frame that changes a little from one index to the next."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin((x + 4 * index) / 40.0)
    green = 128 + 100 * np.cos((y - 3 * index) / 55.0)
    blue = (x + y + 5 * index) % 256
    rgb = np.stack([red, green, blue], axis=2).clip(0, 255).astype(np.uint8)
    cv2.rectangle(rgb, (40 + 3 * index % 200, 60), (140 + 3 * index % 200, 160), (20, 20, 20), -1)
    return rgb


def write_bag(path, frames, width, height, storage):
    """Write ``frames`` raw rgb8 frames and as many JPEG frames, 100 ms apart."""
    Time = TYPES.types['builtin_interfaces/msg/Time']
    Header = TYPES.types['std_msgs/msg/Header']
    Image = TYPES.types['sensor_msgs/msg/Image']
    CompressedImage = TYPES.types['sensor_msgs/msg/CompressedImage']
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    start = 1_700_000_000_000_000_000
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        raw = writer.add_connection(RAW_TOPIC, 'sensor_msgs/msg/Image', typestore=TYPES)
        jpeg = writer.add_connection(JPEG_TOPIC, 'sensor_msgs/msg/CompressedImage',
                                     typestore=TYPES)
        for index in range(frames):
            time_ns = start + index * 100_000_000
            header = Header(stamp=Time(sec=time_ns // 10**9, nanosec=time_ns % 10**9),
                            frame_id='camera')
            rgb = _scene(index, width, height)
            msg = Image(header=header, height=height, width=width, encoding='rgb8',
                        is_bigendian=0, step=width * 3, data=rgb.reshape(-1))
            writer.write(raw, time_ns, TYPES.serialize_cdr(msg, 'sensor_msgs/msg/Image'))
            ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, 90])
            msg = CompressedImage(header=header, format='rgb8; jpeg compressed bgr8',
                                  data=encoded.reshape(-1))
            writer.write(jpeg, time_ns + 1,
                         TYPES.serialize_cdr(msg, 'sensor_msgs/msg/CompressedImage'))


def read_and_decode(bag, topic):
    """Read every frame of ``topic`` and decode it to RGB; return the frame count."""
    count = 0
    with Reader(bag) as reader:
        connections = [c for c in reader.connections if c.topic == topic]
        for connection, _, rawdata in reader.messages(connections=connections):
            msg = TYPES.deserialize_cdr(rawdata, connection.msgtype)
            message_to_rgb(msg)
            count += 1
    return count


def convert(bag, topic, out, image_format):
    """Run the converter on ``topic`` into ``out``; return the number of frames kept."""
    options = ConversionOptions(image_topics=[topic], out=str(out), image_format=image_format)
    return convert_bags([bag], options).frames_kept


def measure(bag, topic, image_format, repeats, scratch):
    """Time both paths ``repeats`` times, alternating; return the best frames/s of each."""
    best = {'reader': 0.0, 'converter': 0.0}
    frames = {}
    for repeat in range(repeats):
        order = ('reader', 'converter') if repeat % 2 == 0 else ('converter', 'reader')
        for name in order:
            out = scratch / f'out-{topic.strip("/").replace("/", "_")}-{image_format}-{repeat}'
            started = time.perf_counter()
            if name == 'reader':
                count = read_and_decode(bag, topic)
            else:
                count = convert(bag, topic, out, image_format)
            seconds = time.perf_counter() - started
            shutil.rmtree(out, ignore_errors=True)
            frames[name] = count
            best[name] = max(best[name], count / seconds)
    if frames['reader'] != frames['converter']:
        raise RuntimeError(f'the converter kept {frames["converter"]} of {frames["reader"]}')
    return frames['reader'], best['reader'], best['converter']


def machine():
    """Describe this machine in one line."""
    return (f'{os.cpu_count()} CPU cores, {platform.machine()}, '
            f'Python {platform.python_version()}, {platform.system()}')


def main(argv=None):
    """Write the bag, measure, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--frames', type=int, default=120, help='frames per camera')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', default=os.path.join(tempfile.gettempdir(),
                                                       'bench_bag_to_coco.json'))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='bench_bag_to_coco-') as scratch:
        scratch = Path(scratch)
        bag = scratch / 'bench_bag'
        write_bag(bag, args.frames, args.width, args.height, args.storage)
        size_mb = sum(p.stat().st_size for p in bag.iterdir()) / 1e6
        cases = [('rgb8 raw -> jpg', RAW_TOPIC, 'jpg'), ('rgb8 raw -> png', RAW_TOPIC, 'png'),
                 ('jpeg compressed -> jpg (stored as recorded)', JPEG_TOPIC, 'jpg')]
        rows = []
        for label, topic, image_format in cases:
            frames, reader_fps, converter_fps = measure(
                bag, topic, image_format, args.repeats, scratch)
            rows.append({'case': label, 'topic': topic, 'frames': frames,
                         'reader_fps': round(reader_fps, 1),
                         'converter_fps': round(converter_fps, 1),
                         'ratio': round(converter_fps / reader_fps, 3)})

    command = 'python -m benchmarks.bench_bag_to_coco ' + ' '.join(argv or sys.argv[1:])
    result = {'machine': machine(), 'storage': args.storage,
              'frame_size': f'{args.width}x{args.height}', 'bag_mb': round(size_mb, 1),
              'repeats': args.repeats, 'command': command.strip(), 'rows': rows}
    print(f'machine: {result["machine"]}')
    print(f'bag: rosbag2 {args.storage}, {args.frames} frames per camera, '
          f'{args.width}x{args.height}, {size_mb:.1f} MB; best of {args.repeats}')
    print()
    print('| case | frames | reader + decode (frames/s) | converter (frames/s) | ratio |')
    print('|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['case']} | {row['frames']} | {row['reader_fps']:.1f} | "
              f"{row['converter_fps']:.1f} | {row['ratio']:.2f} |")
    Path(args.json).write_text(json.dumps(result, indent=1) + '\n')
    print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
