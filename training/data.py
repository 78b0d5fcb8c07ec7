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
Caption datasets for training: a COCO caption folder and its split files -> model inputs.

A dataset folder holds ``images/``, ``annotations.json`` (COCO captions) and, after
``training.split``, ``train_split.jsonl`` / ``val_split.jsonl`` with one image per line. The
collator builds the same token layout that :mod:`blip2_ros.captioner` builds at inference
(query-token placeholders, then the prompt, then the caption), so what is trained is what runs.
"""

from dataclasses import dataclass
import os

import numpy as np
from PIL import Image
import torch

from training.coco import ANNOTATIONS_FILE, DatasetError, image_path, read_annotations
from training.split import caption_texts, read_split_file
from training.validate import is_id

IGNORE_INDEX = -100
ALL_SPLIT = 'all'


@dataclass(frozen=True)
class CaptionRecord:
    """One image of a split with every caption it has."""

    image_id: int
    file_name: str
    captions: tuple


def split_path(folder, split):
    """Return the path of ``<split>_split.jsonl`` inside a dataset folder."""
    return os.path.join(folder, f'{split}_split.jsonl')


def _resplit_hint(folder):
    return f're-run python -m training.split {folder}'


def _images_by_id(coco, folder):
    """Return ``{id: file_name}`` of the images of annotations.json."""
    images = {}
    for index, image in enumerate(coco['images']):
        if (not isinstance(image, dict) or not is_id(image.get('id'))
                or not isinstance(image.get('file_name'), str)):
            raise DatasetError(
                f'{os.path.join(folder, ANNOTATIONS_FILE)} images[{index}] needs an integer id '
                f'and a file_name; run python -m training.validate {folder}')
        images.setdefault(image['id'], image['file_name'])
    return images


def load_split(folder, split):
    """
    Read the images and captions of one split of a dataset folder.

    ``split`` names ``<split>_split.jsonl`` (e.g. 'train', 'val'); 'all' reads every image of
    ``annotations.json``. A split file only says which images belong to the split: file names
    and captions come from ``annotations.json``, so corrected captions count without a new
    split, and a split file that names an image annotations.json no longer has (or has under
    another file name) is refused as stale. Raises :class:`DatasetError` with a fix-it message.
    """
    if split != ALL_SPLIT:
        path = split_path(folder, split)
        if not os.path.isfile(path):
            raise DatasetError(
                f'{path} does not exist: run python -m training.split {folder} first, '
                f"or use split '{ALL_SPLIT}' for every image of {ANNOTATIONS_FILE}")
    coco = read_annotations(folder)
    images = _images_by_id(coco, folder)
    captions = caption_texts(coco, folder)
    if split == ALL_SPLIT:
        return [CaptionRecord(image_id, file_name, tuple(captions.get(image_id, ())))
                for image_id, file_name in images.items()]
    records = []
    for entry in read_split_file(path, _resplit_hint(folder)):
        image_id = entry['image_id']
        if image_id not in images:
            raise DatasetError(f'{path} is stale: image {image_id} is no longer in '
                               f'{ANNOTATIONS_FILE}; {_resplit_hint(folder)}')
        if images[image_id] != entry['file_name']:
            raise DatasetError(
                f"{path} is stale: image {image_id} is {entry['file_name']!r} there but "
                f'{images[image_id]!r} in {ANNOTATIONS_FILE}; {_resplit_hint(folder)}')
        records.append(CaptionRecord(image_id, images[image_id],
                                     tuple(captions.get(image_id, ()))))
    return records


def unsplit_warning(folder, splits):
    """Return the line that says how many captioned images no split names, or None."""
    count = len(unsplit_images(folder, splits))
    if not count:
        return None
    return (f'{count} images of annotations.json are in no split: re-run python -m '
            f'training.split {folder} to use them')


def unsplit_images(folder, splits=('train', 'val')):
    """
    Return the ids of captioned images of annotations.json that no split of ``splits`` names.

    These are frames appended (e.g. by bag_to_coco) after the last ``training.split``: nothing
    trains or evaluates on them until split runs again. Splits whose file does not exist, and
    empty names, are skipped; with 'all' among ``splits`` every image is used and the list is
    empty. Raises :class:`DatasetError` like :func:`load_split`.
    """
    if ALL_SPLIT in splits:
        return []
    coco = read_annotations(folder)
    images = _images_by_id(coco, folder)
    named = set()
    for split in splits:
        path = split_path(folder, split)
        if split and os.path.isfile(path):
            named.update(entry['image_id']
                         for entry in read_split_file(path, _resplit_hint(folder)))
    return sorted(image_id for image_id in caption_texts(coco, folder)
                  if image_id in images and image_id not in named)


def load_rgb(path):
    """Read an image file as an HxWx3 uint8 RGB array."""
    with Image.open(path) as image:
        return np.array(image.convert('RGB'))


class CaptionPairs(torch.utils.data.Dataset):
    """
    One item per (image, caption) pair of a split.

    Images are decoded when an item is read; ``cache_images`` keeps the decoded frames in memory,
    which pays off for small images read every epoch (the synthetic demo) and costs
    height * width * 3 bytes per image.
    """

    def __init__(self, folder, records, cache_images=False):
        """Index the pairs of ``records`` (images under ``folder``/images)."""
        self.folder = folder
        self.records = list(records)
        self.pairs = [(index, caption) for index, record in enumerate(self.records)
                      for caption in record.captions]
        self.cache_images = cache_images
        self._cache = {}

    def __len__(self):
        """Return the number of (image, caption) pairs."""
        return len(self.pairs)

    def image(self, record_index):
        """Return the decoded RGB frame of ``self.records[record_index]``."""
        frame = self._cache.get(record_index)
        if frame is None:
            record = self.records[record_index]
            frame = load_rgb(image_path(self.folder, record.file_name))
            if self.cache_images:
                self._cache[record_index] = frame
        return frame

    def __getitem__(self, index):
        """Return ``{'image', 'caption', 'image_id'}`` for pair ``index``."""
        record_index, caption = self.pairs[index]
        return {'image': self.image(record_index), 'caption': caption,
                'image_id': self.records[record_index].image_id}


def prompt_token_ids(tokenizer, prompt):
    """Tokenize a prompt exactly as the inference core does (special tokens included)."""
    return tokenizer(prompt, add_special_tokens=True)['input_ids']


class CaptionCollator:
    """
    Turn dataset items into ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels``.

    Decoder-only models (OPT) read ``[image placeholders] [BOS] prompt caption EOS`` and learn
    only the caption and EOS. Encoder-decoder models (T5) read ``[image placeholders] prompt EOS``
    in the encoder and learn ``caption EOS`` as decoder labels. Placeholders, prompt and padding
    are -100 in the labels.
    """

    def __init__(self, processor, image_token_id, num_query_tokens, is_encoder_decoder,
                 prompt='', max_caption_tokens=40):
        """Store the processor and the token layout settings of the model."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(image_token_id)
        self.num_query_tokens = int(num_query_tokens)
        self.is_encoder_decoder = bool(is_encoder_decoder)
        self.prompt = prompt
        self.max_caption_tokens = int(max_caption_tokens)
        if self.tokenizer.pad_token_id is None:
            raise DatasetError('the checkpoint tokenizer has no pad token; set one in its '
                               'tokenizer_config.json')
        self.prompt_ids = prompt_token_ids(self.tokenizer, prompt)

    def caption_ids(self, caption):
        """Tokenize a caption (no special tokens) cut to max_caption_tokens, then append EOS."""
        if self.prompt and not self.is_encoder_decoder:
            # BPE tokenizers mark word starts with the space: after a prompt the caption is a
            # new word, as it is when the model generates it.
            caption = ' ' + caption
        ids = self.tokenizer(caption, add_special_tokens=False)['input_ids']
        return ids[:self.max_caption_tokens] + [self.tokenizer.eos_token_id]

    def pixel_values(self, images):
        """Preprocess frames with the checkpoint's own image processor."""
        return self.processor.image_processor(list(images), return_tensors='pt')['pixel_values']

    def __call__(self, items):
        """Collate items from :class:`CaptionPairs` into one padded batch."""
        placeholders = [self.image_token_id] * self.num_query_tokens
        captions = [self.caption_ids(item['caption']) for item in items]
        if self.is_encoder_decoder:
            inputs = [placeholders + self.prompt_ids] * len(items)
            labels = captions
        else:
            inputs = [placeholders + self.prompt_ids + caption for caption in captions]
            labels = [[IGNORE_INDEX] * (len(placeholders) + len(self.prompt_ids)) + caption
                      for caption in captions]
        batch = {'pixel_values': self.pixel_values(item['image'] for item in items)}
        batch['input_ids'], batch['attention_mask'] = _pad(inputs, self.tokenizer.pad_token_id)
        batch['labels'], _ = _pad(labels, IGNORE_INDEX)
        return batch


def _pad(sequences, value):
    """Right-pad lists of ids into a LongTensor and its attention mask."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = 1
    return ids, mask
