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

A generator pipeline: the bags are read in time order (:mod:`training.bags`), each frame is
selected or skipped (every N-th, minimum interval, caption present, decodable, not a
duplicate), captioned from one source (:mod:`training.caption_sources`) and written to the
dataset (:mod:`training.dataset_writer`). Frames go through ``blip2_ros.image_conversion``, the
same function the node uses.

Every time is bag time: the time the recorder logged the message, in nanoseconds since the
epoch, as ``ros2 bag info`` shows it. The same command on the same bags gives the same
dataset, byte for byte; an error leaves DIR as it was.

The options are the fields of :class:`ConversionOptions`: the command line is built from them,
so each default and help text is written once, there.
"""

import argparse
from collections import Counter
from dataclasses import dataclass, field, fields, MISSING
import sys
import time

from blip2_ros.image_conversion import ImageConversionError, message_to_rgb
import cv2
import numpy as np
from training.bags import BagFile, ConversionError
from training.caption_sources import (AUTO_CAPTION, CAPTION_TOPIC, CAPTIONS_FILE,
                                      load_captioner, read_captions_file, read_topic_captions)
from training.dataset_writer import dataset_lock, DatasetWriter

IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
STRING_TYPE = 'std_msgs/msg/String'
IMAGE_FORMATS = ('jpg', 'png')
PROGRESS_INTERVAL_S = 2.0

_THUMBNAIL_SIZE = (16, 16)

# Help sections of the command line, in the order the options come.
_CAPTIONS = 'captions (choose at most one source)'
_SELECTION = 'frame selection (per bag and topic)'
_OUTPUT = 'output'


def _option(help_text, default=MISSING, **cli):
    """
    Return a ConversionOptions field with its command-line help and settings.

    ``cli`` may hold ``flag`` (default: the field name with dashes), ``metavar``, ``group``
    (the help section), ``choices`` and ``default_text`` (how the help names the default).
    """
    return field(default=default, metadata={'help': help_text, **cli})


@dataclass
class ConversionOptions:
    """What to convert and how; ``__post_init__`` rejects values that cannot work."""

    image_topics: list = _option(
        'sensor_msgs Image or CompressedImage topic; repeat for several cameras',
        flag='--image-topic', metavar='TOPIC')
    out: str = _option('dataset folder: created, or appended to if it holds a dataset',
                       metavar='DIR')
    caption_topic: str = _option(
        'std_msgs/String topic: each frame gets the latest caption', '', group=_CAPTIONS,
        metavar='TOPIC')
    caption_max_age: float = _option(
        'a topic caption older than this does not apply', 5.0, group=_CAPTIONS,
        metavar='SECONDS')
    captions_file: str = _option(
        '.csv or .jsonl of start,end,caption (bag time in seconds)', '', group=_CAPTIONS,
        metavar='FILE')
    auto_caption: str = _option(
        'pre-label with a BLIP-2 checkpoint (hub id or folder); the captions are marked '
        'machine_generated for review', '', group=_CAPTIONS, metavar='MODEL')
    auto_caption_prompt: str | None = _option(
        'prompt for --auto-caption', None, group=_CAPTIONS, metavar='TEXT',
        default_text='the one the model was trained with, if training.train made it, else none')
    auto_caption_batch_size: int = _option(
        'frames --auto-caption captions at once', 8, group=_CAPTIONS, metavar='N')
    auto_caption_max_new_tokens: int = _option(
        'longest --auto-caption caption, in tokens', 30, group=_CAPTIONS,
        flag='--max-new-tokens', metavar='N')
    device: str = _option('auto, cpu, cuda or cuda:N', 'auto', group=_CAPTIONS)
    trust_remote_code: bool = _option(
        "run the code the --auto-caption checkpoint's config.json names (auto_map); only for "
        'checkpoints you trust', False, group=_CAPTIONS, default_text='refuse such a checkpoint')
    keep_uncaptioned: bool = _option(
        'keep frames no caption applies to', False, group=_CAPTIONS, default_text='skip them')
    every_n: int = _option('consider only every N-th message', 1, group=_SELECTION,
                           metavar='N')
    min_interval: float = _option('at least this much bag time between kept frames', 0.0,
                                  group=_SELECTION, metavar='SECONDS')
    max_frames: int = _option('stop after N selected frames in all', 0, group=_SELECTION,
                              metavar='N', default_text='0, no limit')
    dedup: bool = _option('skip frames that look like the last kept one', False,
                          group=_SELECTION)
    dedup_threshold: float = _option(
        'mean grey-level difference of 16x16 thumbnails below which a frame is a duplicate',
        2.0, group=_SELECTION, metavar='LEVELS')
    max_pixels: int = _option('skip frames larger than this (checked before decoding)',
                              40_000_000, group=_SELECTION, metavar='N')
    image_format: str = _option(
        'format for frames that need encoding; JPEG frames are stored as recorded', 'jpg',
        group=_OUTPUT, choices=IMAGE_FORMATS)
    jpeg_quality: int = _option('JPEG quality of encoded frames, 1 to 100', 95, group=_OUTPUT,
                                metavar='Q')

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
            (self.image_format in IMAGE_FORMATS, '--image-format must be jpg or png'),
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
            self.captioner = load_captioner(
                options.auto_caption, options.auto_caption_prompt, options.device,
                options.auto_caption_max_new_tokens, options.trust_remote_code)
        for index, bag in enumerate(bags, start=1):
            lookup = captions_file_lookup
            if options.caption_topic:
                lookup, notes = read_topic_captions(bag, options.caption_topic,
                                                    options.caption_max_age)
                self.summary.notes += notes
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


def convert_bags(bag_paths, options, progress=None, progress_interval=PROGRESS_INTERVAL_S,
                 on_wait=None):
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
    lookup = read_captions_file(options.captions_file) if options.captions_file else None
    bags = []
    try:
        for path in bag_paths:
            bag = BagFile(path)
            bag.open_reader()
            bags.append(bag)
        summary = ConversionSummary(bags=len(bags))
        summary.notes = _check_topics(bags, options)
        with dataset_lock(options.out, on_wait) as out:
            output = DatasetWriter(out)
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


def _default_text(option):
    """Return how the help names the default of a ConversionOptions field."""
    if 'default_text' in option.metadata:
        return option.metadata['default_text']
    value = option.default
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, float):
        return f'{value:g}'
    return str(value) if value != '' else 'none'


def _add_option(group, option):
    """Add the flag of one ConversionOptions field; its default and help come from the field."""
    metadata = option.metadata
    flag = metadata.get('flag', '--' + option.name.replace('_', '-'))
    settings = {'dest': option.name, 'help': metadata['help']}
    if option.default is MISSING:
        settings['required'] = True
    else:
        settings['default'] = option.default
        settings['help'] += f' (default: {_default_text(option)})'
    if option.type is bool:
        settings['action'] = 'store_true'
    else:
        settings['metavar'] = metadata.get('metavar')
        settings['choices'] = metadata.get('choices')
        if option.type is list:
            settings['action'] = 'append'
        elif option.type in (int, float):
            settings['type'] = option.type
    group.add_argument(flag, **settings)


def build_parser():
    """Return the command line parser: the bags, the ConversionOptions fields, progress."""
    parser = argparse.ArgumentParser(
        prog='bag_to_coco',
        description='Turn ROS 1 / ROS 2 bags into a COCO captions dataset (DIR/images/ and '
                    'DIR/annotations.json). Times are bag (recording) time.')
    parser.add_argument('bags', nargs='+', metavar='BAG',
                        help='a ROS 1 .bag file, a rosbag2 folder, or a .db3 / .mcap file')
    groups = {None: parser}
    for option in fields(ConversionOptions):
        name = option.metadata.get('group')
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        _add_option(groups[name], option)
    output = groups[_OUTPUT]
    output.add_argument('--progress-every', type=float, default=PROGRESS_INTERVAL_S,
                        metavar='SECONDS', help='at most one progress line on stderr this '
                        f'often (default: {PROGRESS_INTERVAL_S:g})')
    output.add_argument('--quiet', action='store_true',
                        help='no progress lines on stderr (default: off)')
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
