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
Writing bag_to_coco's dataset folder: new or appended to, staged, locked, moved into place.

File names are ``<bag>__<topic>__<time_ns>.<ext>``, so the same frame always gets the same
name. When DIR already holds a dataset, new frames are appended with ids after the existing
ones; frames already in it (same bag name, topic and time) are known, so the converter leaves
them alone: nothing is renumbered, and running the same command twice leaves annotations.json
byte for byte as it was. Output is built in a temporary folder next to DIR and moved into
place at the end, so an error leaves DIR untouched. Runs on the same DIR take turns: each
holds a lock (the hidden file ``.DIR.lock`` next to DIR) from reading the dataset to
committing it.
"""

from contextlib import contextmanager
import fcntl
import os
from pathlib import Path
import re
import shutil

from blip2_ros.checkpoint import one_line
from training import coco
from training.bags import ConversionError


def _slug(text):
    return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('._-') or 'x'


def _bag_slug(name):
    for suffix in ('.bag', '.db3', '.mcap'):
        if name.endswith(suffix) and len(name) > len(suffix):
            return _slug(name[:-len(suffix)])
    return _slug(name)


class DatasetWriter:
    """The dataset being built: existing content, new entries, and the staging folder."""

    def __init__(self, out):
        """Read the dataset in ``out`` if it holds one, and make the staging folder beside it."""
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
        """Return a file name for a frame, unique in the dataset."""
        base = f'{_bag_slug(bag)}__{_slug(topic)}__{time_ns}'
        name, copy = f'{base}.{extension}', 1
        while name in self.used_names:
            copy += 1
            name = f'{base}__{copy}.{extension}'
        self.used_names.add(name)
        return name

    def add_image(self, entry, payload):
        """Stage an image's bytes and its COCO ``entry`` (without id); return its new id."""
        entry['id'] = self.next_image_id
        self.next_image_id += 1
        (self.staging / coco.IMAGES_DIR / entry['file_name']).write_bytes(payload)
        self.new_images.append(entry)
        self.known_frames.add((entry['bag'], entry['topic'], entry['timestamp_ns']))
        return entry['id']

    def add_caption(self, image_id, caption, extra):
        """Add a caption of image ``image_id``, with the keys in ``extra``."""
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
        """Delete the staging folder; the dataset folder stays as it was."""
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
