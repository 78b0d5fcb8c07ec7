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

"""Tests for training.data.load_split: a split file names images, annotations.json the rest."""

import json
from pathlib import Path
import shutil

import pytest
from training import bag_to_coco
from training import evaluate
from training import record_synthetic_bag
from training import split
from training import train
from training.coco import DatasetError
from training.data import load_split
from training.data import unsplit_images

START_SEC = 1767225600


def append_recording(root, bag_name, start_sec, seed):
    """Record 6 s of the synthetic factory and append them to root/data with bag_to_coco."""
    bag = root / bag_name
    assert record_synthetic_bag.main([
        '--out', str(bag), '--frames', '60', '--size', '32x24', '--kinds', 'box',
        '--start-sec', str(start_sec), '--seed', str(seed)]) == 0
    assert bag_to_coco.main([str(bag), '--image-topic', '/camera/image_raw',
                             '--caption-topic', '/factory/true_caption',
                             '--out', str(root / 'data'), '--quiet']) == 0
    return root / 'data'


@pytest.fixture(scope='module')
def recorded(tmp_path_factory):
    """Convert a recorded bag with bag_to_coco and split it, as a user does; return the root."""
    root = tmp_path_factory.mktemp('recorded')
    data = append_recording(root, 'monday', START_SEC, seed=0)
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    return root


@pytest.fixture
def root(recorded, tmp_path):
    """Return a copy of the recorded bag and its dataset that a test may change."""
    shutil.copytree(recorded, tmp_path / 'root')
    return tmp_path / 'root'


def read_json(path):
    return json.loads(Path(path).read_text())


def edit_annotations(data, change):
    annotations = read_json(data / 'annotations.json')
    change(annotations)
    (data / 'annotations.json').write_text(json.dumps(annotations))


def split_lines(data, side):
    return [json.loads(line) for line in (data / f'{side}_split.jsonl').read_text().splitlines()]


def one_line_error(call):
    """Run ``call``; return the message of the DatasetError or SystemExit it must raise."""
    with pytest.raises((DatasetError, SystemExit)) as raised:
        call()
    message = str(raised.value)
    assert '\n' not in message and 'Traceback' not in message
    return message


def test_captions_come_from_annotations_so_corrections_count_without_a_new_split(root):
    data = root / 'data'
    val_ids = [line['image_id'] for line in split_lines(data, 'val')]
    records = load_split(data, 'val')
    assert [record.image_id for record in records] == val_ids
    fixed = records[0].image_id

    def correct(annotations):
        for note in annotations['annotations']:
            if note['image_id'] == fixed:
                note['caption'] = '  no   boxes on the conveyor '

    edit_annotations(data, correct)
    records = load_split(data, 'val')
    assert records[0].captions == ('no boxes on the conveyor',)
    # The split file still holds the old caption: it is not what training reads.
    assert split_lines(data, 'val')[0]['captions'] != ['no boxes on the conveyor']
    assert {record.image_id: record.captions for record in load_split(data, 'all')}[fixed] == (
        'no boxes on the conveyor',)


def test_an_image_deleted_after_splitting_stops_training_with_one_line(root, tmp_path):
    data = root / 'data'
    gone = split_lines(data, 'train')[3]

    def delete(annotations):
        annotations['images'] = [image for image in annotations['images']
                                 if image['id'] != gone['image_id']]
        annotations['annotations'] = [note for note in annotations['annotations']
                                      if note['image_id'] != gone['image_id']]

    # What a user does to drop a bad frame: its entry, its captions and its file.
    edit_annotations(data, delete)
    (data / 'images' / gone['file_name']).unlink()

    expected = (f"{data / 'train_split.jsonl'} is stale: image {gone['image_id']} is no longer "
                f'in annotations.json; re-run python -m training.split {data}')
    assert one_line_error(lambda: load_split(data, 'train')) == expected
    # Training and evaluation stop before loading any model, not with FileNotFoundError later.
    assert one_line_error(lambda: train.main([
        '--model', str(tmp_path / 'no-model'), '--data', str(data), '--output_dir',
        str(tmp_path / 'out'), '--method', 'qformer', '--report_to', 'none'])) == (
        f'error: {expected}')
    assert not (tmp_path / 'out' / 'checkpoint-1').exists()
    assert one_line_error(lambda: evaluate.main([
        '--model', str(tmp_path / 'no-model'), '--data', str(data), '--split', 'train',
        '--out', str(tmp_path / 'eval')])) == f'error: {expected}'

    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    assert gone['image_id'] not in {record.image_id for record in load_split(data, 'train')}


def test_an_image_whose_file_changed_after_splitting_is_stale(root):
    data = root / 'data'
    line = split_lines(data, 'val')[0]
    (data / 'images' / line['file_name']).rename(data / 'images' / 'renamed.jpg')
    edit_annotations(data, lambda annotations: [
        image.update(file_name='renamed.jpg') for image in annotations['images']
        if image['id'] == line['image_id']])
    message = one_line_error(lambda: load_split(data, 'val'))
    assert message == (f"{data / 'val_split.jsonl'} is stale: image {line['image_id']} is "
                       f"{line['file_name']!r} there but 'renamed.jpg' in annotations.json; "
                       f're-run python -m training.split {data}')


@pytest.mark.parametrize('line, problem', [
    ('{"image_id": "abc", "file_name": "x.jpg"}', "image_id must be an integer, not 'abc'"),
    ('{"image_id": 1.5, "file_name": "x.jpg"}', 'image_id must be an integer, not 1.5'),
    ('{"image_id": 1}', 'file_name must be a non-empty string, not None'),
    ('[1, "x.jpg"]', 'is not a JSON object'),
    ('{"image_id": 1, "file_name": ', 'is not JSON'),
])
def test_a_bad_split_line_is_one_line_error(root, line, problem):
    data = root / 'data'
    (data / 'val_split.jsonl').write_text(line + '\n')
    message = one_line_error(lambda: load_split(data, 'val'))
    assert message.startswith(f"{data / 'val_split.jsonl'} line 1")
    assert problem in message
    assert message.endswith(f're-run python -m training.split {data}')


def test_a_split_line_without_captions_takes_them_from_annotations(root):
    data = root / 'data'
    lines = split_lines(data, 'val')
    lines[0]['captions'] = None
    (data / 'val_split.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
    captions = {note['image_id']: note['caption']
                for note in read_json(data / 'annotations.json')['annotations']}
    record = load_split(data, 'val')[0]
    assert record.captions == (captions[lines[0]['image_id']],)
    (data / 'val_split.jsonl').write_text(
        ''.join(json.dumps(line) + '\n' for line in [lines[1], lines[1]]))
    assert f"image {lines[1]['image_id']} is named twice" in one_line_error(
        lambda: load_split(data, 'val'))


def test_frames_appended_after_splitting_are_reported_until_split_runs(
        root, tmp_path, caplog):
    data = root / 'data'
    assert unsplit_images(data) == []
    before = {side: load_split(data, side) for side in ('train', 'val')}
    append_recording(root, 'tuesday', START_SEC + 86400, seed=1)
    tuesday = sorted(image['id'] for image in read_json(data / 'annotations.json')['images']
                     if image['bag'] == 'tuesday')
    assert len(tuesday) == 60
    assert unsplit_images(data) == tuesday
    assert unsplit_images(data, ('train', '')) == sorted(
        tuesday + [line['image_id'] for line in split_lines(data, 'val')])
    assert unsplit_images(data, ('train', 'all')) == []
    # The old split still loads as it was: the new frames are in neither side.
    assert {side: load_split(data, side) for side in ('train', 'val')} == before
    # Training says so before it loads a model (the missing one stops it right after).
    with caplog.at_level('WARNING', logger='training.train'):
        one_line_error(lambda: train.main([
            '--model', str(tmp_path / 'no-model'), '--data', str(data), '--output_dir',
            str(tmp_path / 'out'), '--method', 'qformer', '--report_to', 'none']))
    assert (f'60 images of annotations.json are in no split: re-run python -m training.split '
            f'{data} to use them') in caplog.text
    assert split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '1']) == 0
    assert unsplit_images(data) == []


def test_a_caption_after_a_prompt_is_tokenized_as_the_words_that_follow_it():
    """
    With a byte-level BPE tokenizer (OPT's kind) 'two' and ' two' are different tokens.

    The model generates the caption as the words after the prompt, so the collator must train
    on the tokens of 'a photo of two red boxes', not of 'a photo of' and 'two red boxes' apart.
    """
    import numpy as np
    from tokenizers import decoders, models, pre_tokenizers, processors, Tokenizer, trainers
    from training.data import CaptionCollator, IGNORE_INDEX
    from transformers import Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast

    texts = ['a photo of two red boxes on the conveyor', 'a photo of one blue gear',
             'two boxes', 'red gear on the belt']
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=['<pad>', '</s>', '<image>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(
        single='</s> $A', special_tokens=[('</s>', bpe.token_to_id('</s>'))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token='<pad>',
                                        eos_token='</s>', bos_token='</s>')
    assert (tokenizer('two', add_special_tokens=False)['input_ids']
            != tokenizer(' two', add_special_tokens=False)['input_ids'])
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={'height': 32,
                                                                        'width': 32}),
                               tokenizer=tokenizer, num_query_tokens=4)
    image_token_id = tokenizer.convert_tokens_to_ids('<image>')
    collator = CaptionCollator(processor, image_token_id, 4, is_encoder_decoder=False,
                               prompt='a photo of')
    batch = collator([{'image': np.zeros((32, 32, 3), np.uint8),
                       'caption': 'two red boxes on the conveyor'}])

    whole = tokenizer('a photo of two red boxes on the conveyor')['input_ids']
    prompt = tokenizer('a photo of')['input_ids']
    assert whole[:len(prompt)] == prompt
    eos = tokenizer.eos_token_id
    assert batch['input_ids'][0].tolist() == [image_token_id] * 4 + whole + [eos]
    assert batch['labels'][0].tolist() == (
        [IGNORE_INDEX] * (4 + len(prompt)) + whole[len(prompt):] + [eos])
