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
Split a captions dataset into train and validation sets by blocks of recording time.

``python -m training.split DIR --val-fraction 0.1 --seed 0`` writes DIR/train_split.jsonl and
DIR/val_split.jsonl, one line per captioned image with all its captions.

Neighbouring frames of a recording look nearly the same, so a split by single frames would
put copies of validation frames in the training set. Instead, each recording's frames are cut
into blocks of ``--block-seconds`` of bag time (all topics together, since cameras that record
at the same moment see related scenes), and whole blocks go to one side. A recording is a bag,
or several bags whose times overlap or follow each other within one block (a camera per bag, or
a recording split into parts). Blocks are shuffled with ``--seed`` and given to validation
until it holds the asked fraction of images, so the result may overshoot by part of one
block. Images without a bag and timestamp (a hand-made dataset) are blocks of their own.
Images without captions are left out.

When split files already exist (frames appended by bag_to_coco, captions corrected), every
image they name keeps its side, and so does its block: a model trained on the old train split
is never scored on frames it trained on. Only blocks with no image in the old split are
shuffled and assigned, toward the asked fraction. ``--reshuffle`` assigns every block anew.

The split files name which images belong to each side; training and evaluation read file names
and captions from annotations.json (:func:`training.data.load_split`), so a caption corrected
there needs no new split.
"""

import argparse
from dataclasses import dataclass
import json
import os
import random
import signal
import sys
import threading

from training import coco
from training.validate import check_dataset, DatasetError, is_id

RECORD_KEYS = ('width', 'height', 'bag', 'topic', 'timestamp_ns')
SIDES = (('train', coco.TRAIN_SPLIT_FILE), ('val', coco.VAL_SPLIT_FILE))


@dataclass
class SplitSummary:
    """What went where, and what came from the split files that were there before."""

    train_images: int
    val_images: int
    train_captions: int
    val_captions: int
    train_blocks: int
    val_blocks: int
    uncaptioned_images: int
    kept_images: int = 0
    new_train_images: int = 0
    new_val_images: int = 0
    dropped_images: int = 0
    reshuffled: bool = False
    unreviewed_captions: int = 0


def caption_texts(data, folder):
    """
    Return ``{image_id: [caption, ...]}`` of a COCO captions dict.

    Captions are in annotation id order with runs of white space made one space; empty ones
    are left out. Raises DatasetError naming an annotation that has no image_id or caption.
    """
    notes = data['annotations']
    for index, note in enumerate(notes):
        if (not isinstance(note, dict) or not is_id(note.get('image_id'))
                or not isinstance(note.get('caption'), str)):
            raise DatasetError(
                f'{os.path.join(folder, coco.ANNOTATIONS_FILE)} annotations[{index}] needs an '
                f'integer image_id and a caption string; run python -m training.validate {folder}')
    captions = {}
    # Stable sort: ids that are not integers (validate reports them) keep their file order.
    for note in sorted(notes, key=lambda note: note['id'] if is_id(note.get('id')) else 0):
        text = ' '.join(note['caption'].split())
        if text:
            captions.setdefault(note['image_id'], []).append(text)
    return captions


def read_split_file(path, fix):
    """
    Read the ``{'image_id', 'file_name'}`` of each line of a split file.

    Other keys (captions, bag time) are a copy for people and other tools. Raises DatasetError
    naming the line, ending with ``fix`` (what the user should do).
    """
    entries = []
    seen = set()
    try:
        with open(path, encoding='utf-8') as stream:
            lines = list(stream)
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f'cannot read {path}: {error}; {fix}') from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f'{path} line {number}'
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise DatasetError(f'{where} is not JSON ({error}); {fix}') from None
        if not isinstance(entry, dict):
            raise DatasetError(f'{where} is not a JSON object; {fix}')
        image_id, file_name = entry.get('image_id'), entry.get('file_name')
        if not is_id(image_id):
            raise DatasetError(f'{where}: image_id must be an integer, not {image_id!r}; {fix}')
        if not isinstance(file_name, str) or not file_name:
            raise DatasetError(f'{where}: file_name must be a non-empty string, not '
                               f'{file_name!r}; {fix}')
        if image_id in seen:
            raise DatasetError(f'{where}: image {image_id} is named twice; {fix}')
        seen.add(image_id)
        entries.append({'image_id': image_id, 'file_name': file_name})
    return entries


def _block_keys(images, block_ns):
    """
    Give each image the key of its time block.

    Bags whose recording times overlap, or follow each other within one block, are cut as one
    recording: cameras recorded into bags of their own at the same time, or a recording split
    into several bags, have frames of the same moment in different bags.
    """
    spans = {}
    for image in images:
        if isinstance(image.get('timestamp_ns'), int) and image.get('bag'):
            bag, time_ns = str(image['bag']), image['timestamp_ns']
            first, last = spans.get(bag, (time_ns, time_ns))
            spans[bag] = min(first, time_ns), max(last, time_ns)
    # recording[bag] = (name of the recording's first bag, when the recording starts)
    recording, name, start, end = {}, None, None, None
    for bag, (first, last) in sorted(spans.items(), key=lambda item: (item[1], item[0])):
        if name is None or first >= end + block_ns:
            name, start, end = bag, first, last
        end = max(end, last)
        recording[bag] = name, start
    keys = {}
    for image in images:
        if image.get('bag') and isinstance(image.get('timestamp_ns'), int):
            name, start = recording[str(image['bag'])]
            keys[image['id']] = ('time', name, (image['timestamp_ns'] - start) // block_ns)
        else:
            keys[image['id']] = ('image', '', image['id'])
    return keys


def _previous_sides(folder):
    """Return ``{file_name: 'train' | 'val'}`` from the split files in ``folder``, if any."""
    sides = {}
    for side, file_name in SIDES:
        path = os.path.join(folder, file_name)
        if not os.path.isfile(path):
            continue
        fix = 'repair or delete it, or run split with --reshuffle to split every image anew'
        for entry in read_split_file(path, fix):
            if sides.get(entry['file_name'], side) != side:
                raise DatasetError(
                    f"image {entry['file_name']} is in both {coco.TRAIN_SPLIT_FILE} and "
                    f'{coco.VAL_SPLIT_FILE} of {folder}: run split with --reshuffle to split '
                    'every image anew')
            sides[entry['file_name']] = side
    return sides


def _replace_together(pairs):
    """
    ``os.replace`` each (temporary, path) pair with Ctrl-C and SIGTERM held back until all are.

    Otherwise an interrupt between two renames would leave a new train file beside an old val
    file, which may name the same images.
    """
    held = []
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            saved[number] = signal.signal(number, lambda caught, frame: held.append(caught))
    try:
        for temporary, path in pairs:
            os.replace(temporary, path)
    finally:
        for number, handler in saved.items():
            # None: the old handler was not set from Python and cannot be put back as it was.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
    for number in held:
        signal.raise_signal(number)


def write_split_files(folder, texts):
    """
    Write ``{file_name: text}`` into ``folder`` so that either all files change or none.

    Each text goes to a temporary file first; only when all are on disk do they replace the
    old files.
    """
    pairs = []
    try:
        for file_name, text in texts.items():
            path = os.path.join(folder, file_name)
            pairs.append((coco.write_temporary(path, text), path))
        _replace_together(pairs)
    finally:
        for temporary, _ in pairs:
            if os.path.exists(temporary):
                os.unlink(temporary)


def split_dataset(folder, val_fraction, seed=0, block_seconds=30.0, decode_images=True,
                  reshuffle=False):
    """
    Write the train and val split files of the dataset in ``folder``; return a summary.

    Images named by existing split files keep their side, and new images in their blocks join
    them, unless ``reshuffle`` is true.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f'--val-fraction must be at least 0 and below 1, not {val_fraction}')
    if block_seconds <= 0:
        raise DatasetError(f'--block-seconds must be above 0, not {block_seconds}')
    check_dataset(folder, decode_images=decode_images)
    data = coco.read_annotations(folder)
    captions = caption_texts(data, folder)
    images = [image for image in data['images'] if image['id'] in captions]
    if not images:
        raise DatasetError(f'dataset {folder} has no captioned images to split')
    had_split_files = any(os.path.isfile(os.path.join(folder, name)) for _, name in SIDES)
    previous = {} if reshuffle else _previous_sides(folder)

    keys = _block_keys(images, int(block_seconds * 1e9))
    blocks = {}
    for image in images:
        blocks.setdefault(keys[image['id']], []).append(image)
    kept = {image['id']: previous[image['file_name']] for image in images
            if image['file_name'] in previous}
    # A block with images of the old split stays on their side, so a new frame never sits on
    # the other side of a frame it nearly copies. A block the old split had cut in two (another
    # --block-seconds) gives its new images to the side most of its old images are on.
    block_sides = {}
    for key, members in blocks.items():
        old = [kept[image['id']] for image in members if image['id'] in kept]
        if old:
            block_sides[key] = 'val' if old.count('val') > old.count('train') else 'train'
    new_blocks = sorted(key for key in blocks if key not in block_sides)
    random.Random(seed).shuffle(new_blocks)
    # Old images stay on their own side, new ones go to their block's: count where they end.
    ends = [kept.get(image['id'], side) for key, side in block_sides.items()
            for image in blocks[key]]
    val_count, has_train = ends.count('val'), 'train' in ends
    target = val_fraction * len(images)
    for index, key in enumerate(new_blocks):
        # Leave at least one block to train on.
        if val_count >= target or (not has_train and index == len(new_blocks) - 1):
            break
        block_sides[key] = 'val'
        val_count += len(blocks[key])
    if val_fraction > 0 and val_count == 0 and kept:
        raise DatasetError(
            f'the existing split files of {folder} put no image in val and there is no new '
            'block to give it: run split with --reshuffle to split every block anew')
    if val_fraction > 0 and val_count == 0:
        raise DatasetError(
            f'dataset {folder} has only one time block of {block_seconds:g} s: nothing is left '
            'to validate on; use a smaller --block-seconds or --val-fraction 0')

    sides = {'train': [], 'val': []}
    side_blocks = {'train': set(), 'val': set()}
    new_counts = {'train': 0, 'val': 0}
    for image in sorted(images, key=lambda image: image['id']):
        block = keys[image['id']]
        side = kept.get(image['id']) or block_sides.get(block, 'train')
        if image['id'] not in kept:
            new_counts[side] += 1
        record = {'image_id': image['id'], 'file_name': image['file_name'],
                  'captions': captions[image['id']]}
        record.update({key: image[key] for key in RECORD_KEYS if key in image})
        sides[side].append(record)
        side_blocks[side].add(block)
    if not sides['train']:
        raise DatasetError(f'every image of {folder} would be in val: run split with '
                           '--reshuffle to split every image anew')
    write_split_files(folder, {
        file_name: ''.join(coco.dumps_line(record) for record in sides[side])
        for side, file_name in SIDES})
    return SplitSummary(
        train_images=len(sides['train']), val_images=len(sides['val']),
        train_captions=sum(len(r['captions']) for r in sides['train']),
        val_captions=sum(len(r['captions']) for r in sides['val']),
        train_blocks=len(side_blocks['train']), val_blocks=len(side_blocks['val']),
        uncaptioned_images=len(data['images']) - len(images), kept_images=len(kept),
        new_train_images=new_counts['train'], new_val_images=new_counts['val'],
        dropped_images=len(set(previous) - {image['file_name'] for image in images}),
        reshuffled=reshuffle and had_split_files,
        unreviewed_captions=sum(note.get('machine_generated') is True
                                for note in data['annotations']))


def main(argv=None):
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog='split', description='Split a captions dataset into train/val by time blocks.')
    parser.add_argument('folder', metavar='DIR')
    parser.add_argument('--val-fraction', type=float, default=0.1, metavar='F',
                        help='share of images for validation, 0 <= F < 1 (default 0.1)')
    parser.add_argument('--seed', type=int, default=0, help='shuffles the blocks (default 0)')
    parser.add_argument('--block-seconds', type=float, default=30.0, metavar='SECONDS',
                        help='length of the time blocks that stay together (default 30)')
    parser.add_argument('--no-decode', action='store_true',
                        help='validate images without decoding them (faster)')
    parser.add_argument('--reshuffle', action='store_true',
                        help='split every block anew, ignoring existing split files (by '
                             'default images they name, and their blocks, keep their side); '
                             'images may change sides, so do not score a model trained on the '
                             'old train split on the new val split')
    args = parser.parse_args(argv)
    try:
        summary = split_dataset(args.folder, args.val_fraction, args.seed, args.block_seconds,
                                decode_images=not args.no_decode, reshuffle=args.reshuffle)
    except (DatasetError, OSError) as error:
        print(f'split: error: {error}', file=sys.stderr)
        return 1
    print(f'train: {summary.train_images} images, {summary.train_captions} captions, '
          f'{summary.train_blocks} blocks -> {args.folder}/{coco.TRAIN_SPLIT_FILE}')
    print(f'val: {summary.val_images} images, {summary.val_captions} captions, '
          f'{summary.val_blocks} blocks -> {args.folder}/{coco.VAL_SPLIT_FILE}')
    if summary.uncaptioned_images:
        print(f'left out: {summary.uncaptioned_images} images without a caption')
    if summary.kept_images:
        total = summary.train_images + summary.val_images
        print(f'kept: {summary.kept_images} images of the existing split files stay on their '
              f'side; new: {summary.new_train_images} to train, {summary.new_val_images} to val')
        print(f'val holds {summary.val_images / total:.1%} of the images '
              f'(asked {args.val_fraction:.1%}); --reshuffle splits every block anew')
    if summary.dropped_images:
        print(f'dropped: {summary.dropped_images} images of the existing split files are no '
              f'longer captioned images of {coco.ANNOTATIONS_FILE}')
    if summary.unreviewed_captions:
        # bag_to_coco --auto-caption marks them; a model trained on them learns their mistakes.
        print(f'review: {summary.unreviewed_captions} captions were written by a model and not '
              f'checked yet (machine_generated true in {coco.ANNOTATIONS_FILE}); read them '
              'against the images and set it to false')
    if summary.reshuffled:
        print('reshuffled: images may have changed sides; do not score a model trained on the '
              'old train split on this val split')
    return 0


if __name__ == '__main__':
    sys.exit(main())
