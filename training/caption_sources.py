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
Where bag_to_coco's captions come from: a captions file, a caption topic, or a BLIP-2 model.

Each source is a lookup with ``captions_at(time_ns)``, the captions that apply to a frame at
that bag time (nanoseconds since the epoch):

- :func:`read_captions_file`: ``start,end,caption`` rows (CSV) or objects (JSONL); a frame gets
  every caption whose range holds it, both ends included.
- :func:`read_topic_captions`: a std_msgs/String topic of the same bag; a frame gets the
  latest string at or before it, if it is recent enough, and an empty string ends a caption.
- :func:`load_captioner`: no lookup, a model that captions the kept frames themselves.
"""

from bisect import bisect_right
from collections import Counter
import csv
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
import json
from pathlib import Path

from blip2_ros.checkpoint import one_line
from training.bags import ConversionError

# The caption sources, as annotations name them in their 'source' key.
CAPTION_TOPIC = 'caption_topic'
CAPTIONS_FILE = 'captions_file'
AUTO_CAPTION = 'auto_caption'


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


class RangeCaptions:
    """Look up every sidecar caption whose range contains a time."""

    def __init__(self, ranges):
        """``ranges``: :class:`CaptionRange` items sorted by start."""
        self.ranges = ranges
        self.starts = [item.start_ns for item in ranges]

    def captions_at(self, time_ns):
        """Return the captions whose range holds ``time_ns``, each once, in start order."""
        last = bisect_right(self.starts, time_ns)
        found = []
        for item in self.ranges[:last]:
            if item.end_ns >= time_ns and item.caption not in found:
                found.append(item.caption)
        return found


def read_captions_file(path):
    """Return the :class:`RangeCaptions` of a captions file (see :func:`load_caption_ranges`)."""
    return RangeCaptions(load_caption_ranges(path))


class TopicCaptions:
    """The latest String caption at a time, if it is recent enough; '' ends a caption."""

    def __init__(self, times, texts, max_age_ns):
        """Keep the topic's message ``times`` (sorted, ns) and ``texts``, and the age limit."""
        self.times = times
        self.texts = texts
        self.max_age_ns = max_age_ns

    def captions_at(self, time_ns):
        """Return ``[caption]`` of the latest message at or before ``time_ns``, or ``[]``."""
        index = bisect_right(self.times, time_ns) - 1
        if index < 0 or time_ns - self.times[index] > self.max_age_ns:
            return []
        text = self.texts[index]
        return [text] if text else []


def read_topic_captions(bag, topic, max_age_s):
    """
    Return ``(TopicCaptions, notes)`` of the String ``topic`` in an open ``bag``.

    A bag without the topic gives no captions. ``notes`` says where the bag's index lists
    other message counts than were read (see ``BagFile.check_all_read``).
    """
    if topic not in bag.topics:
        return TopicCaptions([], [], 0), []
    times, texts = [], []
    for connection, time_ns, rawdata in bag.messages([topic]):
        msg = bag.deserialize(connection, rawdata, time_ns)
        times.append(time_ns)
        texts.append(' '.join(str(msg.data).split()))
    notes = bag.check_all_read(Counter({topic: len(times)}))
    return TopicCaptions(times, texts, int(max_age_s * 1e9)), notes


def load_captioner(model, prompt, device, max_new_tokens, trust_remote_code=False):
    """
    Return the node's captioner for ``model`` (hub id or folder); raise ConversionError.

    ``prompt`` None: the prompt the model was trained with, if training.train made it.
    """
    from blip2_ros.captioner import (Blip2Captioner, CaptionerConfig, ModelLoadError,
                                     training_prompt)
    try:
        # A model captions best with the prompt it was trained with, as in the node.
        if prompt is None:
            prompt = training_prompt(model)
        return Blip2Captioner(CaptionerConfig(model=model, device=device, prompt=prompt,
                                              max_new_tokens=max_new_tokens,
                                              trust_remote_code=trust_remote_code))
    except ModelLoadError as error:
        raise ConversionError(f'--auto-caption: {error}') from None
