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
Turn ROS 1 and ROS 2 bags into a COCO captions dataset, without a ROS install.

``python -m training.bag_to_coco BAG [BAG ...] --image-topic TOPIC --out DIR``

Bags are read with the pure-Python ``rosbags`` library: rosbag2 folders (sqlite3 or mcap, with
metadata.yaml), bare ``.db3`` / ``.mcap`` storage files (also the 2019 layout without
metadata.yaml) and ROS 1 ``.bag`` files. The kind is told from the file's first bytes, not its
name. Frames go through ``blip2_ros.image_conversion``, the same function the node uses.

Every time is bag time: the time the recorder logged the message, in nanoseconds since the
epoch, as ``ros2 bag info`` shows it. File names are ``<bag>__<topic>__<time_ns>.<ext>``, so the
same frame always gets the same name. When DIR already holds a dataset, new frames are appended
with ids after the existing ones and frames already in it (same bag name, topic and time) are
left alone: nothing is renumbered, and running the same command twice leaves annotations.json
byte for byte as it was. Output is built in a temporary folder next to DIR and moved into place
at the end, so an error leaves DIR untouched. Runs on the same DIR take turns: each holds a lock
(the hidden file ``.DIR.lock`` next to DIR) from reading the dataset to committing it.
"""

import argparse
from bisect import bisect_right
from collections import Counter
from contextlib import contextmanager
import csv
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
import fcntl
import json
import os
from pathlib import Path
import re
import shutil
import sys
import time

from blip2_ros.checkpoint import one_line
from blip2_ros.image_conversion import ImageConversionError, message_to_rgb
import cv2
import numpy as np
from rosbags.interfaces import MessageDefinitionFormat
from rosbags.rosbag1 import Reader as Rosbag1Reader
from rosbags.rosbag2 import Reader as Rosbag2Reader
from rosbags.typesys import get_types_from_msg, get_typestore, Stores
from training import coco

IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
STRING_TYPE = 'std_msgs/msg/String'

CAPTION_TOPIC = 'caption_topic'
CAPTIONS_FILE = 'captions_file'
AUTO_CAPTION = 'auto_caption'

_ROS1_MAGIC = b'#ROSBAG V2.0'
_SQLITE_MAGIC = b'SQLite format 3\x00'
_MCAP_MAGIC = b'\x89MCAP0\r\n'
_THUMBNAIL_SIZE = (16, 16)


class ConversionError(Exception):
    """A problem with the command's input that stops the conversion; one line for the user."""


@dataclass
class ConversionOptions:
    """What to convert and how; ``__post_init__`` rejects values that cannot work."""

    image_topics: list
    out: str
    caption_topic: str = ''
    caption_max_age: float = 5.0
    captions_file: str = ''
    auto_caption: str = ''
    auto_caption_prompt: str | None = None  # None: the prompt the model was trained with
    auto_caption_batch_size: int = 8
    auto_caption_max_new_tokens: int = 30
    device: str = 'auto'
    keep_uncaptioned: bool = False
    every_n: int = 1
    min_interval: float = 0.0
    max_frames: int = 0
    dedup: bool = False
    dedup_threshold: float = 2.0
    max_pixels: int = 40_000_000
    image_format: str = 'jpg'
    jpeg_quality: int = 95

    def __post_init__(self):
        """Check every value; raise ConversionError saying which flag to fix."""
        if isinstance(self.image_topics, str):
            self.image_topics = [self.image_topics]
        self.image_topics = list(dict.fromkeys(self.image_topics))
        if not self.image_topics:
            raise ConversionError('give at least one --image-topic')
        if not self.out:
            raise ConversionError('give the dataset folder with --out')
        sources = [flag for flag, value in (
            ('--caption-topic', self.caption_topic), ('--captions-file', self.captions_file),
            ('--auto-caption', self.auto_caption)) if value]
        if len(sources) > 1:
            raise ConversionError(f"choose one caption source, not {' and '.join(sources)}")
        checks = [
            (self.caption_max_age > 0, '--caption-max-age must be above 0 seconds'),
            (self.every_n >= 1, '--every-n must be 1 or more'),
            (self.min_interval >= 0, '--min-interval must be 0 or more seconds'),
            (self.max_frames >= 0, '--max-frames must be 0 (no limit) or more'),
            (self.dedup_threshold >= 0, '--dedup-threshold must be 0 or more grey levels'),
            (self.max_pixels >= 1, '--max-pixels must be 1 or more'),
            (self.image_format in ('jpg', 'png'), '--image-format must be jpg or png'),
            (1 <= self.jpeg_quality <= 100, '--jpeg-quality must be between 1 and 100'),
            (self.auto_caption_batch_size >= 1, '--auto-caption-batch-size must be 1 or more'),
            (self.auto_caption_max_new_tokens >= 1, '--max-new-tokens must be 1 or more'),
        ]
        for ok, message in checks:
            if not ok:
                raise ConversionError(message)

    @property
    def caption_source(self):
        """Return which caption source is in use, or '' for none."""
        if self.caption_topic:
            return CAPTION_TOPIC
        if self.captions_file:
            return CAPTIONS_FILE
        if self.auto_caption:
            return AUTO_CAPTION
        return ''


@dataclass
class ConversionSummary:
    """Counts of one conversion run."""

    out: str = ''
    bags: int = 0
    frames_read: int = 0
    frames_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    captions: Counter = field(default_factory=Counter)
    images_without_caption: int = 0
    images_total: int = 0
    annotations_total: int = 0
    stopped_at_max_frames: bool = False
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def lines(self):
        """Return the summary as lines of text for a person."""
        lines = [
            f'dataset: {self.out} ({self.images_total} images, '
            f'{self.annotations_total} captions in total)',
            f'bags: {self.bags}',
            f'frames read: {self.frames_read}',
            f'frames kept: {self.frames_kept}',
            f'frames skipped: {sum(self.skipped.values())}',
        ]
        lines += [f'  {reason}: {count}' for reason, count in sorted(self.skipped.items())]
        lines.append(f'captions added: {sum(self.captions.values())}')
        lines += [f'  from {source}: {count}' for source, count in sorted(self.captions.items())]
        lines.append(f'kept images without a caption: {self.images_without_caption}')
        if self.stopped_at_max_frames:
            lines.append('stopped early: --max-frames reached')
        lines += [f'note: {note}' for note in self.notes]
        rate = self.frames_read / self.seconds if self.seconds > 0 else 0.0
        lines.append(f'time: {self.seconds:.1f} s ({rate:.1f} frames read per second)')
        return lines


def _normalise_type(msgtype):
    """Return 'pkg/msg/Type' for the 2019-era 'pkg/Type' spelling too."""
    parts = msgtype.split('/')
    if len(parts) == 2:
        return f'{parts[0]}/msg/{parts[1]}'
    return msgtype


_DEFAULT_ROS2_TYPESTORE = []


def _default_ros2_typestore():
    if not _DEFAULT_ROS2_TYPESTORE:
        _DEFAULT_ROS2_TYPESTORE.append(get_typestore(Stores.LATEST))
    return _DEFAULT_ROS2_TYPESTORE[0]


class BagFile:
    """One bag opened with rosbags: its topics, time-ordered raw messages, and deserializer."""

    def __init__(self, path):
        """Remember the path; nothing is read until ``open_reader``."""
        self.path = Path(path)
        # Resolved, so that '.' or 'shift1/..' name the bag, not '' or '..'.
        self.name = self.path.resolve().name
        self.kind = ''
        self.is_ros1 = False
        self.topics = {}
        self._reader = None
        self._connections = {}
        self._typestores = {}

    def __enter__(self):
        """Open the bag."""
        self.open_reader()
        return self

    def __exit__(self, *exc_info):
        """Close the bag."""
        self.close()

    def _fail(self, message):
        return ConversionError(f'{self.path}: {message}')

    def _make_reader(self):
        path = self.path
        if not path.exists():
            raise self._fail('no such bag file or folder')
        if path.is_dir():
            if (path / 'metadata.yaml').is_file():
                self.kind = 'rosbag2 folder'
                return Rosbag2Reader(path)
            storage = self._storage_file()
            hint = (f'; to read its storage file without metadata, pass {storage}'
                    if storage else '')
            raise self._fail(f'folder has no metadata.yaml, so it is not a rosbag2 bag{hint}')
        try:
            with open(path, 'rb') as stream:
                head = stream.read(16)
        except OSError as error:
            raise self._fail(f'cannot read: {one_line(error, 240)}') from None
        if not head:
            raise self._fail('file is empty')
        if head.startswith(_ROS1_MAGIC):
            self.kind = 'ROS 1 bag'
            self.is_ros1 = True
            return Rosbag1Reader(path)
        if head.startswith(b'#ROSBAG V'):
            version = head.split(b'\n')[0].decode('ascii', 'replace')
            raise self._fail(f"'{version}' is not supported: only ROS 1 bag format V2.0 is")
        for magic, suffix, kind in ((_SQLITE_MAGIC, '.db3', 'rosbag2 sqlite3 file'),
                                    (_MCAP_MAGIC, '.mcap', 'rosbag2 mcap file')):
            if head.startswith(magic):
                if path.suffix != suffix:
                    raise self._fail(f'this is a {kind}; its name must end in {suffix}')
                self.kind = kind
                return Rosbag2Reader(path)
        raise self._fail('not a ROS bag: expected a ROS 1 .bag, a .db3 or .mcap file, '
                         'or a rosbag2 folder with metadata.yaml')

    def _storage_file(self):
        """Return the first storage file of a rosbag2 folder, or None."""
        storage = sorted(p.name for p in self.path.iterdir() if p.suffix in ('.db3', '.mcap'))
        return self.path / storage[0] if storage else None

    def open_reader(self):
        """Open the bag and list its topics; raise ConversionError if it cannot be read."""
        reader = self._make_reader()
        try:
            reader.open()
        except ConversionError:
            raise
        except Exception as error:
            text = str(error).lower()
            hint = ''
            if self.is_ros1 and 'index' in text:
                hint = ' (a recording cut short has no index; `rosbag reindex` can repair it)'
            elif 'magic' in text:
                hint = ' (the file is truncated: was the recording stopped cleanly?)'
            raise self._fail(f'cannot open {self.kind}: {one_line(error, 240)}{hint}') from None
        self._reader = reader
        try:
            for connection in reader.connections:
                topic = connection.topic
                self.topics.setdefault(topic, _normalise_type(connection.msgtype))
                self._connections.setdefault(topic, []).append(connection)
        except Exception as error:
            self.close()
            raise self._fail(f'cannot list topics: {one_line(error, 240)}') from None

    def close(self):
        """Close the reader if it is open."""
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # noqa: B902 - closing a damaged bag must not hide the first error
                pass

    def topics_of_types(self, types):
        """Return the sorted topics whose type is one of ``types``."""
        return sorted(topic for topic, msgtype in self.topics.items() if msgtype in types)

    def message_count(self, topics):
        """Return how many messages the bag's index lists on ``topics``."""
        return sum(c.msgcount for topic in topics for c in self._connections.get(topic, ()))

    def check_all_read(self, read_per_topic):
        """
        Compare the messages read per topic with the counts the bag's index lists.

        rosbags finds a rosbag2 folder's messages by the topic name and type in metadata.yaml,
        so an edited metadata.yaml makes a topic silently empty: raise ConversionError when the
        index lists messages on a topic and none were read. Return notes for other differences.
        """
        notes = []
        for topic, read in read_per_topic.items():
            listed = self.message_count([topic])
            if listed and not read:
                storage = self._storage_file() if self.path.is_dir() else None
                hint = f', or pass {storage} to read it without metadata.yaml' if storage else ''
                raise self._fail(
                    f'metadata.yaml and the storage file disagree: metadata.yaml lists {listed} '
                    f'messages on {topic} ({self.topics[topic]}), the storage file has none '
                    f'under that name and type; restore the original metadata.yaml{hint}')
            if read != listed:
                notes.append(f'{self.name}: the index lists {listed} messages on {topic}, '
                             f'{read} were read')
        return notes

    def messages(self, topics):
        """Yield ``(connection, time_ns, rawdata)`` on ``topics`` in time order."""
        connections = [c for topic in topics for c in self._connections.get(topic, ())]
        if not connections:
            return
        iterator = self._reader.messages(connections=connections)
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise self._fail(
                    f'the bag is damaged or truncated: {one_line(error, 240)}') from None
            yield item

    def _typestore(self, connection):
        msgdef = connection.msgdef
        if msgdef.format != MessageDefinitionFormat.MSG:
            if self.is_ros1:
                raise self._fail(f'{connection.topic} has no message definition')
            # Image, CompressedImage and String are the same in every ROS 2 release, so
            # the built-in definitions serve bags without (or with IDL) definitions.
            return _default_ros2_typestore()
        key = (msgdef.data, connection.msgtype)
        typestore = self._typestores.get(key)
        if typestore is None:
            # ROS 1 definitions differ from ROS 2 ones (Header has a seq): use the bag's own.
            typestore = get_typestore(Stores.EMPTY)
            msgtype = _normalise_type(connection.msgtype)
            typestore.register(get_types_from_msg(msgdef.data, msgtype))
            self._typestores[key] = typestore
        return typestore

    def deserialize(self, connection, rawdata, time_ns):
        """Return the message object; raise ConversionError if the bytes do not decode."""
        msgtype = _normalise_type(connection.msgtype)
        try:
            typestore = self._typestore(connection)
            if self.is_ros1:
                return typestore.deserialize_ros1(rawdata, msgtype)
            return typestore.deserialize_cdr(rawdata, msgtype)
        except ConversionError:
            raise
        except Exception as error:
            raise self._fail(
                f'the {msgtype} message on {connection.topic} at {time_ns} ns cannot be '
                f'deserialized ({one_line(error, 240)}); the bag is damaged') from None


@dataclass
class CaptionRange:
    """A caption that applies to every frame from ``start_ns`` to ``end_ns``, both included."""

    start_ns: int
    end_ns: int
    caption: str


def _seconds_to_ns(value, where):
    try:
        seconds = Decimal(str(value).strip())
    except InvalidOperation:
        raise ConversionError(f'{where}: {value!r} is not a time in seconds') from None
    if not seconds.is_finite() or seconds < 0:
        raise ConversionError(f'{where}: {value!r} is not a time in seconds')
    return int(seconds * 1_000_000_000)


def load_caption_ranges(path):
    """
    Read a sidecar file of ``start,end,caption`` rows (CSV) or objects (JSONL).

    Times are bag time in seconds since the epoch (decimals allowed). A CSV may start with a
    ``start,end,caption`` header; blank lines and lines starting with '#' are ignored.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ('.csv', '.jsonl'):
        raise ConversionError(f'{path}: captions file must end in .csv or .jsonl')
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(
            f'cannot read captions file {path}: {one_line(error, 240)}') from None
    rows = []
    if suffix == '.csv':
        for number, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not ''.join(row).strip() or row[0].lstrip().startswith('#'):
                continue
            if not rows and row[0].strip().lower() == 'start':
                continue
            if len(row) < 3:
                raise ConversionError(
                    f'{path} line {number}: expected start,end,caption, got {len(row)} fields')
            rows.append((number, row[0], row[1], ','.join(row[2:])))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((number, record['start'], record['end'], record['caption']))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConversionError(
                    f'{path} line {number}: expected a JSON object with start, end and caption'
                ) from None
    ranges = []
    for number, start, end, caption in rows:
        where = f'{path} line {number}'
        start_ns = _seconds_to_ns(start, where)
        end_ns = _seconds_to_ns(end, where)
        if end_ns < start_ns:
            raise ConversionError(f'{where}: end {end} is before start {start}')
        if not isinstance(caption, str) or not caption.strip():
            raise ConversionError(f'{where}: the caption is empty')
        ranges.append(CaptionRange(start_ns, end_ns, ' '.join(caption.split())))
    if not ranges:
        raise ConversionError(f'{path}: no caption ranges in the file')
    ranges.sort(key=lambda item: (item.start_ns, item.end_ns))
    return ranges


class _RangeCaptions:
    """Look up every sidecar caption whose range contains a time."""

    def __init__(self, ranges):
        self.ranges = ranges
        self.starts = [item.start_ns for item in ranges]

    def captions_at(self, time_ns):
        last = bisect_right(self.starts, time_ns)
        found = []
        for item in self.ranges[:last]:
            if item.end_ns >= time_ns and item.caption not in found:
                found.append(item.caption)
        return found


class _TopicCaptions:
    """The latest String caption at a time, if it is recent enough; '' ends a caption."""

    def __init__(self, times, texts, max_age_ns):
        self.times = times
        self.texts = texts
        self.max_age_ns = max_age_ns

    def captions_at(self, time_ns):
        index = bisect_right(self.times, time_ns) - 1
        if index < 0 or time_ns - self.times[index] > self.max_age_ns:
            return []
        text = self.texts[index]
        return [text] if text else []


def _read_topic_captions(bag, topic, max_age_s):
    times, texts = [], []
    for connection, time_ns, rawdata in bag.messages([topic]):
        msg = bag.deserialize(connection, rawdata, time_ns)
        times.append(time_ns)
        texts.append(' '.join(str(msg.data).split()))
    return _TopicCaptions(times, texts, int(max_age_s * 1e9))


def _slug(text):
    return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('._-') or 'x'


def _bag_slug(name):
    for suffix in ('.bag', '.db3', '.mcap'):
        if name.endswith(suffix) and len(name) > len(suffix):
            return _slug(name[:-len(suffix)])
    return _slug(name)


def _thumbnail(rgb):
    small = cv2.resize(rgb, _THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)


def _stamp_ns(msg):
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _jpeg_bytes(msg):
    """Return the JPEG payload of a CompressedImage to store unchanged, else None."""
    if not hasattr(msg, 'format') or 'compresseddepth' in str(msg.format).lower():
        return None
    data = msg.data
    payload = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return payload if payload[:2] == b'\xff\xd8' else None


class _Stream:
    """Selection state of one (bag, topic) stream."""

    __slots__ = ('messages_seen', 'last_kept_ns', 'last_thumbnail')

    def __init__(self):
        self.messages_seen = 0
        self.last_kept_ns = None
        self.last_thumbnail = None


class _Output:
    """The dataset being built: existing content, new entries, and the staging folder."""

    def __init__(self, out):
        # Resolved, so that '--out .' has a name and a parent to stage the new dataset in.
        self.out = Path(out).resolve()
        self.appending = False
        self.dataset = coco.empty_dataset()
        if self.out.exists() and not self.out.is_dir():
            raise ConversionError(f'--out {self.out} is a file; give a folder')
        if self.out.is_dir() and any(self.out.iterdir()):
            if not (self.out / coco.ANNOTATIONS_FILE).is_file():
                raise ConversionError(
                    f'--out {self.out} is not empty and holds no {coco.ANNOTATIONS_FILE}; '
                    'give a new or empty folder, or a dataset made by bag_to_coco to append to')
            try:
                self.dataset = coco.read_annotations(self.out)
            except coco.DatasetError as error:
                raise ConversionError(f'cannot append to --out: {error}') from None
            self.appending = True
        images = self.dataset['images']
        annotations = self.dataset['annotations']
        self.known_frames = {
            (image.get('bag'), image.get('topic'), image.get('timestamp_ns'))
            for image in images if isinstance(image, dict)}
        self.used_names = {image.get('file_name') for image in images if isinstance(image, dict)}
        self.next_image_id = 1 + max((_int_id(image) for image in images), default=0)
        self.next_annotation_id = 1 + max((_int_id(note) for note in annotations), default=0)
        self.new_images = []
        self.new_annotations = []
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = coco.create_folder(self.out.parent, f'.{self.out.name}.partial-')
        (self.staging / coco.IMAGES_DIR).mkdir()

    def file_name(self, bag, topic, time_ns, extension):
        base = f'{_bag_slug(bag)}__{_slug(topic)}__{time_ns}'
        name, copy = f'{base}.{extension}', 1
        while name in self.used_names:
            copy += 1
            name = f'{base}__{copy}.{extension}'
        self.used_names.add(name)
        return name

    def add_image(self, entry, payload):
        entry['id'] = self.next_image_id
        self.next_image_id += 1
        (self.staging / coco.IMAGES_DIR / entry['file_name']).write_bytes(payload)
        self.new_images.append(entry)
        self.known_frames.add((entry['bag'], entry['topic'], entry['timestamp_ns']))
        return entry['id']

    def add_caption(self, image_id, caption, extra):
        annotation = {'id': self.next_annotation_id, 'image_id': image_id, 'caption': caption}
        annotation.update(extra)
        self.next_annotation_id += 1
        self.new_annotations.append(annotation)

    def commit(self):
        """Move the new dataset into place; annotations.json is replaced last."""
        self.dataset['images'].extend(self.new_images)
        self.dataset['annotations'].extend(self.new_annotations)
        if not self.appending:
            coco.write_text_atomic(self.staging / coco.ANNOTATIONS_FILE, coco.dumps(self.dataset))
            if not self.out.is_dir():
                os.rename(self.staging, self.out)
                return
            # Fill the empty folder rather than replace it: it may be the user's working
            # directory ('--out .'), which would then be a deleted folder in their shell.
            os.rename(self.staging / coco.IMAGES_DIR, self.out / coco.IMAGES_DIR)
            os.replace(self.staging / coco.ANNOTATIONS_FILE, self.out / coco.ANNOTATIONS_FILE)
            self.staging.rmdir()
            return
        if self.new_images or self.new_annotations:
            images_dir = self.out / coco.IMAGES_DIR
            images_dir.mkdir(exist_ok=True)
            # The new annotations.json is on disk before any image moves in: a full disk
            # stops the append here, and renames take no space.
            annotations = coco.write_temporary(self.out / coco.ANNOTATIONS_FILE,
                                               coco.dumps(self.dataset))
            moved = []
            try:
                for entry in self.new_images:
                    name = entry['file_name']
                    os.replace(self.staging / coco.IMAGES_DIR / name, images_dir / name)
                    moved.append(name)
                os.replace(annotations, self.out / coco.ANNOTATIONS_FILE)
            except BaseException:
                for name in moved:
                    os.replace(images_dir / name, self.staging / coco.IMAGES_DIR / name)
                annotations.unlink(missing_ok=True)
                raise
        shutil.rmtree(self.staging, ignore_errors=True)

    def discard(self):
        shutil.rmtree(self.staging, ignore_errors=True)


@contextmanager
def dataset_lock(out, on_wait=None):
    """
    Hold the exclusive lock of dataset folder ``out`` while the ``with`` block runs.

    A conversion holds it from reading DIR/annotations.json until the new one is in place, so
    runs on the same DIR, in any process, take turns instead of overwriting each other's
    images and ids. A run that finds it taken waits; ``on_wait`` (a callable taking one line)
    hears about that once. Yields the resolved folder.
    """
    out = Path(out).resolve()
    if out.is_dir() and os.path.ismount(out):
        # The lock and the new dataset are made beside DIR, and the dataset is renamed into
        # it, which cannot cross from one filesystem to another (a container's volume).
        raise ConversionError(f'--out {out} is a mount point; give a folder inside it, e.g. '
                              f'{out / "dataset"}')
    # Beside DIR, not in it: DIR may not exist yet, and a failed run must leave it as it was.
    # The file stays after the run: deleting it would let a third run lock a new file while a
    # waiting run still holds the old one. The kernel drops the lock when a run dies.
    lock_path = out.parent / f'.{out.name}.lock'
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(lock_path, 'a')
    except OSError as error:
        raise ConversionError(
            f'cannot create the lock file {lock_path} for --out: {one_line(error, 240)}') from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Wait rather than fail: both runs' frames are wanted, and this one appends after
            # the other's instead of having to be started again by hand.
            if on_wait is not None:
                on_wait(f'waiting for another bag_to_coco run on {out}')
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield out


def _int_id(entry):
    value = entry.get('id') if isinstance(entry, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _check_topics(bags, options):
    """Fail before converting anything if a topic is missing everywhere or has a wrong type."""
    notes = []
    wanted = [(topic, IMAGE_TYPES, 'image') for topic in options.image_topics]
    if options.caption_topic:
        wanted.append((options.caption_topic, (STRING_TYPE,), 'caption'))
    for topic, types, role in wanted:
        present = [bag for bag in bags if topic in bag.topics]
        if not present:
            available = sorted({t for bag in bags for t in bag.topics_of_types(types)})
            where = bags[0].path if len(bags) == 1 else f'any of the {len(bags)} bags'
            listing = ', '.join(available) if available else 'none'
            raise ConversionError(
                f"{role} topic '{topic}' is not in {where}; its {role} topics are: {listing}")
        for bag in present:
            msgtype = bag.topics[topic]
            if msgtype not in types:
                raise ConversionError(
                    f"{bag.path}: topic '{topic}' is {msgtype}, not {' or '.join(types)}; "
                    f"its {role} topics are: {', '.join(bag.topics_of_types(types)) or 'none'}")
        notes += [f"{bag.name} has no topic '{topic}'" for bag in bags if topic not in bag.topics]
    return notes


def _load_captioner(options):
    from blip2_ros.captioner import (Blip2Captioner, CaptionerConfig, ModelLoadError,
                                     training_prompt)
    try:
        # A model captions best with the prompt it was trained with, as in the node.
        prompt = options.auto_caption_prompt
        if prompt is None:
            prompt = training_prompt(options.auto_caption)
        return Blip2Captioner(CaptionerConfig(
            model=options.auto_caption, device=options.device, prompt=prompt,
            max_new_tokens=options.auto_caption_max_new_tokens))
    except ModelLoadError as error:
        raise ConversionError(f'--auto-caption: {error}') from None


class _Converter:
    """One run: read the bags, select and convert frames, caption them, write the dataset."""

    def __init__(self, options, output, summary, progress, progress_interval):
        self.options = options
        self.output = output
        self.summary = summary
        self.progress = progress
        self.progress_interval = progress_interval
        self.streams = {}
        self.selected = 0
        self.pending = []
        self.captioner = None
        self.min_interval_ns = int(options.min_interval * 1e9)
        self.last_progress = time.monotonic()
        self.started = time.monotonic()

    def run(self, bags, captions_file_lookup):
        options = self.options
        if options.auto_caption:
            self.captioner = _load_captioner(options)
        for index, bag in enumerate(bags, start=1):
            lookup = captions_file_lookup
            if options.caption_topic:
                if options.caption_topic in bag.topics:
                    lookup = _read_topic_captions(bag, options.caption_topic,
                                                  options.caption_max_age)
                    self.summary.notes += bag.check_all_read(
                        Counter({options.caption_topic: len(lookup.times)}))
                else:
                    lookup = _TopicCaptions([], [], 0)
            if not self._convert_bag(bag, index, len(bags), lookup):
                self.summary.stopped_at_max_frames = True
                break
        self._flush_auto_captions()

    def _report(self, bag, index, count, read_in_bag, total_in_bag, force=False):
        """Report progress at most every progress_interval; return whether a line went out."""
        if self.progress is None:
            return False
        now = time.monotonic()
        if not force and now - self.last_progress < self.progress_interval:
            return False
        self.last_progress = now
        rate = self.summary.frames_read / max(now - self.started, 1e-9)
        self.progress(
            f'[{index}/{count}] {bag.name}: {read_in_bag}/{total_in_bag} frames read, '
            f'{self.summary.frames_kept} kept in total, {rate:.1f} frames/s')
        return True

    def _convert_bag(self, bag, index, count, lookup):
        """Convert one bag; return False once --max-frames frames have been selected."""
        options = self.options
        summary = self.summary
        topics = [topic for topic in options.image_topics if topic in bag.topics]
        total = bag.message_count(topics)
        read_in_bag = 0
        read_per_topic = Counter(dict.fromkeys(topics, 0))
        reported = False
        for connection, time_ns, rawdata in bag.messages(topics):
            if options.max_frames and self.selected >= options.max_frames:
                return False
            summary.frames_read += 1
            read_in_bag += 1
            read_per_topic[connection.topic] += 1
            reported |= self._report(bag, index, count, read_in_bag, total)
            reason = self._frame(bag, connection, time_ns, rawdata, lookup)
            if reason:
                summary.skipped[reason] += 1
        # Only a bag read to the end can be compared with its index.
        summary.notes += bag.check_all_read(read_per_topic)
        if reported:
            # A run long enough to report progress also says when each bag is done.
            self._report(bag, index, count, read_in_bag, total, force=True)
        return not (options.max_frames and self.selected >= options.max_frames)

    def _frame(self, bag, connection, time_ns, rawdata, lookup):
        """Handle one image message; return the skip reason, or '' when it was kept."""
        options = self.options
        topic = connection.topic
        stream = self.streams.setdefault((bag.name, topic), _Stream())
        position = stream.messages_seen
        stream.messages_seen += 1
        if position % options.every_n:
            return 'every_n'
        last_kept_ns = stream.last_kept_ns
        if last_kept_ns is not None and time_ns - last_kept_ns < self.min_interval_ns:
            return 'min_interval'
        captions = lookup.captions_at(time_ns) if lookup is not None else []
        needs_caption = options.caption_source in (CAPTION_TOPIC, CAPTIONS_FILE)
        if needs_caption and not captions and not options.keep_uncaptioned:
            return 'no_caption'
        msg = bag.deserialize(connection, rawdata, time_ns)
        try:
            rgb = message_to_rgb(msg, max_pixels=options.max_pixels)
        except ImageConversionError as error:
            return error.reason
        thumbnail = None
        if options.dedup:
            thumbnail = _thumbnail(rgb)
            if (stream.last_thumbnail is not None and float(
                    np.abs(thumbnail - stream.last_thumbnail).mean()) < options.dedup_threshold):
                return 'duplicate'
        stream.last_kept_ns = time_ns
        stream.last_thumbnail = thumbnail
        self.selected += 1
        if (bag.name, topic, time_ns) in self.output.known_frames:
            return 'already_in_dataset'
        self._keep(bag, topic, time_ns, msg, rgb, captions)
        return ''

    def _keep(self, bag, topic, time_ns, msg, rgb, captions):
        options = self.options
        payload = _jpeg_bytes(msg)
        if payload is not None:
            extension = 'jpg'
        else:
            extension = options.image_format
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            params = ([cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality]
                      if extension == 'jpg' else [])
            ok, encoded = cv2.imencode(f'.{extension}', bgr, params)
            if not ok:
                raise ConversionError(f'cannot encode a {rgb.shape} frame as {extension}')
            payload = encoded.tobytes()
        entry = {
            'file_name': self.output.file_name(bag.name, topic, time_ns, extension),
            'width': int(rgb.shape[1]),
            'height': int(rgb.shape[0]),
            'bag': bag.name,
            'topic': topic,
            'timestamp_ns': int(time_ns),
            'header_stamp_ns': _stamp_ns(msg),
            'frame_id': str(msg.header.frame_id),
            'source_encoding': str(getattr(msg, 'encoding', None) or msg.format),
        }
        image_id = self.output.add_image(entry, payload)
        self.summary.frames_kept += 1
        source = options.caption_source
        if source == AUTO_CAPTION:
            # A zero-copy rgb8 view of a deserialized message is read-only, which torch
            # warns about; the copy also lets the message's buffer go while the batch fills.
            self.pending.append((image_id, rgb if rgb.flags.writeable else rgb.copy()))
            if len(self.pending) >= options.auto_caption_batch_size:
                self._flush_auto_captions()
            return
        extra = {'source': source, 'machine_generated': False}
        if source == CAPTION_TOPIC:
            extra['caption_topic'] = options.caption_topic
        for caption in captions:
            self.output.add_caption(image_id, caption, extra)
            self.summary.captions[source] += 1
        if not captions:
            self.summary.images_without_caption += 1

    def _flush_auto_captions(self):
        if not self.pending:
            return
        image_ids = [image_id for image_id, _ in self.pending]
        captions = self.captioner.caption([rgb for _, rgb in self.pending])
        self.pending = []
        extra = {'source': AUTO_CAPTION, 'machine_generated': True,
                 'model': self.options.auto_caption}
        for image_id, caption in zip(image_ids, captions):
            caption = ' '.join(caption.split())
            if caption:
                self.output.add_caption(image_id, caption, extra)
                self.summary.captions[AUTO_CAPTION] += 1
            else:
                self.summary.images_without_caption += 1


def convert_bags(bag_paths, options, progress=None, progress_interval=2.0, on_wait=None):
    """
    Convert ``bag_paths`` into the dataset at ``options.out`` and return a ConversionSummary.

    ``progress`` (a callable taking one line of text) hears about long runs at most every
    ``progress_interval`` seconds; ``on_wait`` hears once if another run holds DIR's lock and
    this one waits for it (see ``dataset_lock``). Raises ConversionError; DIR is then left as
    it was.
    """
    started = time.monotonic()
    if not bag_paths:
        raise ConversionError('give at least one bag')
    lookup = load_caption_ranges(options.captions_file) if options.captions_file else None
    lookup = _RangeCaptions(lookup) if lookup else None
    bags = []
    try:
        for path in bag_paths:
            bag = BagFile(path)
            bag.open_reader()
            bags.append(bag)
        summary = ConversionSummary(bags=len(bags))
        summary.notes = _check_topics(bags, options)
        with dataset_lock(options.out, on_wait) as out:
            output = _Output(out)
            try:
                converter = _Converter(options, output, summary, progress, progress_interval)
                converter.run(bags, lookup)
                output.commit()
            except BaseException:
                output.discard()
                raise
    finally:
        for bag in bags:
            bag.close()
    summary.out = str(output.out)
    summary.images_total = len(output.dataset['images'])
    summary.annotations_total = len(output.dataset['annotations'])
    summary.seconds = time.monotonic() - started
    return summary


def build_parser():
    """Return the command line parser."""
    parser = argparse.ArgumentParser(
        prog='bag_to_coco',
        description='Turn ROS 1 / ROS 2 bags into a COCO captions dataset (DIR/images/ and '
                    'DIR/annotations.json). Times are bag (recording) time.')
    parser.add_argument('bags', nargs='+', metavar='BAG',
                        help='a ROS 1 .bag file, a rosbag2 folder, or a .db3 / .mcap file')
    parser.add_argument('--image-topic', action='append', required=True, dest='image_topics',
                        metavar='TOPIC', help='sensor_msgs Image or CompressedImage topic; repeat '
                        'for several cameras')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help='dataset folder: created, or appended to if it holds a dataset')
    source = parser.add_argument_group('captions (choose at most one source)')
    source.add_argument('--caption-topic', default='', metavar='TOPIC',
                        help='std_msgs/String topic: each frame gets the latest caption')
    source.add_argument('--caption-max-age', type=float, default=5.0, metavar='SECONDS',
                        help='a topic caption older than this does not apply (default 5)')
    source.add_argument('--captions-file', default='', metavar='FILE',
                        help='.csv or .jsonl of start,end,caption (bag time in seconds)')
    source.add_argument('--auto-caption', default='', metavar='MODEL',
                        help='pre-label with a BLIP-2 checkpoint (hub id or folder); the '
                        'captions are marked machine_generated for review')
    source.add_argument('--auto-caption-prompt', default=None, metavar='TEXT',
                        help='prompt for --auto-caption (default: the one the model was '
                        'trained with, if training.train made it, else none)')
    source.add_argument('--auto-caption-batch-size', type=int, default=8, metavar='N')
    source.add_argument('--max-new-tokens', type=int, default=30, metavar='N',
                        dest='auto_caption_max_new_tokens')
    source.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    source.add_argument('--keep-uncaptioned', action='store_true',
                        help='keep frames no caption applies to (default: skip them)')
    select = parser.add_argument_group('frame selection (per bag and topic)')
    select.add_argument('--every-n', type=int, default=1, metavar='N',
                        help='consider only every N-th message')
    select.add_argument('--min-interval', type=float, default=0.0, metavar='SECONDS',
                        help='at least this much bag time between kept frames')
    select.add_argument('--max-frames', type=int, default=0, metavar='N',
                        help='stop after N selected frames in all (0: no limit)')
    select.add_argument('--dedup', action='store_true',
                        help='skip frames that look like the last kept one')
    select.add_argument('--dedup-threshold', type=float, default=2.0, metavar='LEVELS',
                        help='mean grey-level difference of 16x16 thumbnails below which a '
                        'frame is a duplicate (default 2)')
    select.add_argument('--max-pixels', type=int, default=40_000_000, metavar='N',
                        help='skip frames larger than this (checked before decoding)')
    output = parser.add_argument_group('output')
    output.add_argument('--image-format', choices=('jpg', 'png'), default='jpg',
                        help='format for frames that need encoding; JPEG frames are stored '
                        'as recorded')
    output.add_argument('--jpeg-quality', type=int, default=95, metavar='Q')
    output.add_argument('--progress-every', type=float, default=2.0, metavar='SECONDS',
                        help='at most one progress line on stderr this often (default 2)')
    output.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    return parser


def main(argv=None):
    """Command line entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    bags = values.pop('bags')
    quiet = values.pop('quiet')
    progress_every = values.pop('progress_every')

    def progress(line):
        print(f'bag_to_coco: {line}', file=sys.stderr, flush=True)

    try:
        options = ConversionOptions(**values)
        # The wait line goes out even with --quiet: a run that waits silently looks hung.
        summary = convert_bags(bags, options, progress=None if quiet else progress,
                               progress_interval=progress_every, on_wait=progress)
    except ConversionError as error:
        print(f'bag_to_coco: error: {error}', file=sys.stderr)
        return 1
    except OSError as error:
        # A full disk or a folder without write permission: nothing was moved into the dataset.
        print(f"bag_to_coco: error: {error}; the dataset folder {values['out']} was left as it "
              'was', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('bag_to_coco: interrupted; the dataset folder was left as it was', file=sys.stderr)
        return 130
    for line in summary.lines():
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
