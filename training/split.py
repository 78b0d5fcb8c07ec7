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
put copies of validation frames in the training set. Instead, each bag's frames are cut into
blocks of ``--block-seconds`` of bag time (all topics of the bag together, since cameras that
record at the same moment see related scenes), and whole blocks go to one side. Blocks are
shuffled with ``--seed`` and given to validation until it holds the asked fraction of images,
so the result may overshoot by part of one block. Images without a bag and timestamp (a
hand-made dataset) are blocks of their own. Images without captions are left out.
"""

import argparse
from dataclasses import dataclass
import random
import sys

from training import coco
from training.validate import check_dataset, DatasetError

RECORD_KEYS = ('width', 'height', 'bag', 'topic', 'timestamp_ns')


@dataclass
class SplitSummary:
    """What went where."""

    train_images: int
    val_images: int
    train_captions: int
    val_captions: int
    train_blocks: int
    val_blocks: int
    uncaptioned_images: int


def _block_keys(images, block_ns):
    """Give each image the key of its time block."""
    starts = {}
    for image in images:
        if isinstance(image.get('timestamp_ns'), int) and image.get('bag'):
            bag = image['bag']
            starts[bag] = min(starts.get(bag, image['timestamp_ns']), image['timestamp_ns'])
    keys = {}
    for image in images:
        bag = image.get('bag')
        if bag in starts and isinstance(image.get('timestamp_ns'), int):
            offset = image['timestamp_ns'] - starts[bag]
            keys[image['id']] = ('time', str(bag), offset // block_ns)
        else:
            keys[image['id']] = ('image', '', image['id'])
    return keys


def split_dataset(folder, val_fraction, seed=0, block_seconds=30.0, decode_images=True):
    """Write the train and val split files of the dataset in ``folder``; return a summary."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f'--val-fraction must be at least 0 and below 1, not {val_fraction}')
    if block_seconds <= 0:
        raise DatasetError(f'--block-seconds must be above 0, not {block_seconds}')
    check_dataset(folder, decode_images=decode_images)
    data = coco.read_annotations(folder)
    captions = {}
    for note in sorted(data['annotations'], key=lambda note: note['id']):
        captions.setdefault(note['image_id'], []).append(' '.join(note['caption'].split()))
    images = [image for image in data['images'] if image['id'] in captions]
    if not images:
        raise DatasetError(f'dataset {folder} has no captioned images to split')

    keys = _block_keys(images, int(block_seconds * 1e9))
    blocks = {}
    for image in images:
        blocks.setdefault(keys[image['id']], []).append(image)
    order = sorted(blocks)
    random.Random(seed).shuffle(order)
    target = val_fraction * len(images)
    val_keys = set()
    val_count = 0
    for key in order:
        if val_count >= target or len(val_keys) == len(order) - 1:
            break
        val_keys.add(key)
        val_count += len(blocks[key])
    if val_fraction > 0 and not val_keys:
        raise DatasetError(
            f'dataset {folder} has only one time block of {block_seconds:g} s: nothing is left '
            'to validate on; use a smaller --block-seconds or --val-fraction 0')

    sides = {'train': [], 'val': []}
    for image in sorted(images, key=lambda image: image['id']):
        record = {'image_id': image['id'], 'file_name': image['file_name'],
                  'captions': captions[image['id']]}
        record.update({key: image[key] for key in RECORD_KEYS if key in image})
        sides['val' if keys[image['id']] in val_keys else 'train'].append(record)
    for side, file_name in (('train', coco.TRAIN_SPLIT_FILE), ('val', coco.VAL_SPLIT_FILE)):
        text = ''.join(coco.dumps_line(record) for record in sides[side])
        coco.write_text_atomic(f'{folder}/{file_name}', text)
    return SplitSummary(
        train_images=len(sides['train']), val_images=len(sides['val']),
        train_captions=sum(len(r['captions']) for r in sides['train']),
        val_captions=sum(len(r['captions']) for r in sides['val']),
        train_blocks=len(order) - len(val_keys), val_blocks=len(val_keys),
        uncaptioned_images=len(data['images']) - len(images))


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
    args = parser.parse_args(argv)
    try:
        summary = split_dataset(args.folder, args.val_fraction, args.seed, args.block_seconds,
                                decode_images=not args.no_decode)
    except DatasetError as error:
        print(f'split: error: {error}', file=sys.stderr)
        return 1
    print(f'train: {summary.train_images} images, {summary.train_captions} captions, '
          f'{summary.train_blocks} blocks -> {args.folder}/{coco.TRAIN_SPLIT_FILE}')
    print(f'val: {summary.val_images} images, {summary.val_captions} captions, '
          f'{summary.val_blocks} blocks -> {args.folder}/{coco.VAL_SPLIT_FILE}')
    if summary.uncaptioned_images:
        print(f'left out: {summary.uncaptioned_images} images without a caption')
    return 0


if __name__ == '__main__':
    sys.exit(main())
