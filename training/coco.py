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
The dataset layout shared by bag_to_coco, split, validate and training, and its file I/O.

A dataset is a folder::

    DIR/annotations.json    COCO captions: info, licenses, images, annotations
    DIR/images/<file_name>  every image; ``file_name`` is relative to DIR/images
    DIR/train_split.jsonl   written by training.split: one image per line with its captions
    DIR/val_split.jsonl

JSON is written with sorted keys and a fixed indent, and replaced atomically, so the same
content always gives the same bytes and a reader never sees a half-written file.
"""

import json
import os
from pathlib import Path
import uuid

ANNOTATIONS_FILE = 'annotations.json'
IMAGES_DIR = 'images'
TRAIN_SPLIT_FILE = 'train_split.jsonl'
VAL_SPLIT_FILE = 'val_split.jsonl'


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message is one line that names the problem."""


def empty_dataset():
    """Return the skeleton of a COCO captions dataset with no images."""
    return {
        'info': {
            'description': 'Image captions from ROS bags',
            'version': '1.0',
            'contributor': 'blip2_ros bag_to_coco',
        },
        'licenses': [],
        'images': [],
        'annotations': [],
    }


def dumps(data):
    """Serialise JSON deterministically: sorted keys, one-space indent, trailing newline."""
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + '\n'


def dumps_line(data):
    """Serialise one JSON Lines record deterministically."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(',', ':')) + '\n'


# Not tempfile.mkstemp / mkdtemp: their files and folders are private (0600 / 0700), and
# renamed into place they would keep other users, e.g. a training container's, out of the
# dataset. These get the modes open() and mkdir() give, the umask applied.

def _umask():
    """Return the process's umask, read without changing it where Linux tells it."""
    try:
        with open('/proc/self/status', encoding='ascii') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and set it back; a file another thread creates in
    # between would get umask 0.
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_mode(folder=False):
    """Return the mode open() (or, for a folder, mkdir()) gives a new file: the umask applied."""
    return (0o777 if folder else 0o666) & ~_umask()


def write_temporary(path, text):
    """Write ``text`` to a new file beside ``path``, on disk, to be renamed onto it; return it."""
    path = Path(path)
    temporary = path.parent / f'.{path.name}.{uuid.uuid4().hex}'
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, 'w', encoding='utf-8') as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink()
        raise
    return temporary


def create_folder(parent, prefix):
    """Create a new, uniquely named folder ``parent``/``prefix``<random> and return its path."""
    folder = Path(parent) / f'{prefix}{uuid.uuid4().hex}'
    folder.mkdir()
    return folder


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    temporary = write_temporary(path, text)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_annotations(folder):
    """Load ``folder``/annotations.json; raise DatasetError if it is missing or not COCO."""
    path = Path(folder) / ANNOTATIONS_FILE
    try:
        with open(path, encoding='utf-8') as stream:
            data = json.load(stream)
    except FileNotFoundError:
        raise DatasetError(f'{path} does not exist: is {folder} a dataset folder?') from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f'cannot read {path}: {error}') from None
    except json.JSONDecodeError as error:
        raise DatasetError(f'{path} is not valid JSON: {error}') from None
    if not isinstance(data, dict):
        raise DatasetError(f'{path} must hold a JSON object with images and annotations')
    for key in ('images', 'annotations'):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path} has no '{key}' list; it is not a COCO captions file")
    return data


def image_path(folder, file_name):
    """Return where the image ``file_name`` of the dataset in ``folder`` lives."""
    return Path(folder) / IMAGES_DIR / file_name


def read_split(path):
    """Read a split file written by training.split: a list of dicts, one per image."""
    records = []
    with open(path, encoding='utf-8') as stream:
        for line in stream:
            if line.strip():
                records.append(json.loads(line))
    return records
