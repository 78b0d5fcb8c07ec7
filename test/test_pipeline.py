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
The path a user takes, end to end, through the command-line tools' main() on tiny data.

record_synthetic_bag -> bag_to_coco -> split -> validate -> train (lora and qformer) ->
evaluate -> the trained output captions frames in a real CaptionNode over DDS. The steps run
once per module, in order, as a user would run them; the tests then check what each step left.
"""

import json
import threading

from blip2_ros.caption_node import CaptionNode
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from blip2_ros.demo.synthetic_factory import scene_at, SceneSpec
import numpy as np
import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import image_message, wait_for
from safetensors.torch import load_file
from sensor_msgs.msg import Image
from std_msgs.msg import String
import torch
from training import bag_to_coco, evaluate, record_synthetic_bag, split, train, validate
from training.data import load_rgb, load_split

pytestmark = [pytest.mark.slow, pytest.mark.ros]

FRAMES = 120
RATE_HZ = 10.0
HEIGHT, WIDTH = 48, 64
START_SEC = 1767225600
# Boxes only: every word of these captions is in the tiny checkpoints' vocabulary.
SPEC = SceneSpec(kinds=('box',))
PROMPT = 'a photo of'
EVAL_IMAGES = 8
MAX_NEW_TOKENS = 8
TIMEOUT = 30.0
TRAIN_FLAGS = ['--max_steps', '4', '--per_device_train_batch_size', '4', '--learning_rate', '1e-3',
               '--prompt', PROMPT, '--logging_steps', '1', '--save_steps', '1000',
               '--disable_tqdm', 'true', '--dataloader_pin_memory', 'false']


def frame_index(timestamp_ns):
    """Return which recorded frame a dataset image came from, by its bag timestamp."""
    return round((timestamp_ns - START_SEC * 10**9) * RATE_HZ / 1e9)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory, lively_opt_checkpoint):
    """Run every step once, in order, and return the folders and what the steps printed."""
    root = tmp_path_factory.mktemp('pipeline')
    bag, data = root / 'bag', root / 'data'
    exit_codes = {
        'record': record_synthetic_bag.main([
            '--out', str(bag), '--frames', str(FRAMES), '--rate-hz', str(RATE_HZ),
            '--size', f'{WIDTH}x{HEIGHT}', '--kinds', 'box', '--start-sec', str(START_SEC)]),
        'bag_to_coco': bag_to_coco.main([
            str(bag), '--image-topic', '/camera/image_raw',
            '--caption-topic', '/factory/true_caption', '--out', str(data), '--quiet']),
        # 12 s of recording in 2 s blocks: 6 blocks, at least one goes to validation.
        'split': split.main([str(data), '--val-fraction', '0.2', '--block-seconds', '2']),
        'validate': validate.main([str(data)]),
    }
    base = lively_opt_checkpoint
    exit_codes['train_lora'] = train.main([
        '--model', str(base), '--data', str(data), '--output_dir', str(root / 'lora'),
        '--method', 'lora', '--report_to', 'none', '--eval_strategy', 'no', *TRAIN_FLAGS])
    exit_codes['train_qformer'] = train.main([
        '--model', str(base), '--data', str(data), '--output_dir', str(root / 'qformer'),
        '--method', 'qformer', '--report_to', 'tensorboard', '--eval_strategy', 'steps',
        '--eval_steps', '4', '--caption_eval_images', '4', '--logged_images', '2',
        *TRAIN_FLAGS])
    # One run scores both fine-tunes on the same images: qformer as the baseline column.
    exit_codes['evaluate'] = evaluate.main([
        '--model', str(base), '--adapter', str(root / 'lora'), '--compare', str(root / 'qformer'),
        '--data', str(data), '--split', 'val', '--out', str(root / 'evaluation'),
        '--max_images', str(EVAL_IMAGES), '--max_new_tokens', str(MAX_NEW_TOKENS),
        '--tokenizer', 'simple'])
    return {'root': root, 'bag': bag, 'data': data, 'base': base, 'lora': root / 'lora',
            'qformer': root / 'qformer', 'evaluation': root / 'evaluation',
            'exit_codes': exit_codes}


def test_every_step_succeeds(pipeline):
    assert pipeline['exit_codes'] == dict.fromkeys(pipeline['exit_codes'], 0)


def test_dataset_holds_the_recorded_frames_with_their_true_captions(pipeline):
    data = pipeline['data']
    train_records = [json.loads(line) for line in (data / 'train_split.jsonl').open()]
    val_records = [json.loads(line) for line in (data / 'val_split.jsonl').open()]
    assert len(train_records) + len(val_records) == FRAMES
    assert train_records and val_records
    assert not {r['image_id'] for r in train_records} & {r['image_id'] for r in val_records}
    # Whole 2 s blocks of recording time go to one side, so near-copies never straddle it.
    sides = {}
    for side, records in (('train', train_records), ('val', val_records)):
        for record in records:
            block = (record['timestamp_ns'] - START_SEC * 10**9) // (2 * 10**9)
            sides.setdefault(block, set()).add(side)
    assert sorted(sides) == list(range(6))
    assert all(len(block_sides) == 1 for block_sides in sides.values())
    for record in train_records + val_records:
        scene = scene_at(0, frame_index(record['timestamp_ns']), (HEIGHT, WIDTH), SPEC)
        assert record['captions'] == [scene.caption]
        stored = load_rgb(data / 'images' / record['file_name'])
        assert stored.shape == (HEIGHT, WIDTH, 3)
        # JPEG keeps the picture close to what the camera recorded.
        assert np.abs(stored.astype(int) - scene.image.astype(int)).mean() < 6


def test_training_writes_loadable_outputs_that_differ_from_the_base(pipeline):
    base_weights = load_file(pipeline['base'] / 'model.safetensors')

    adapter = load_file(pipeline['lora'] / 'adapter_model.safetensors')
    lora_b = [key for key in adapter if 'lora_B' in key]
    assert lora_b and all(adapter[key].abs().sum() > 0 for key in lora_b)

    trained = load_file(pipeline['qformer'] / 'model.safetensors')
    assert trained.keys() == base_weights.keys()
    changed = {name for name in trained if not torch.equal(trained[name], base_weights[name])}
    assert changed and all(name.startswith(train.QFORMER_PREFIXES) for name in changed)

    for method in ('lora', 'qformer'):
        info = json.loads((pipeline[method] / train.TRAINING_INFO_FILE).read_text())
        assert info['method'] == method and info['prompt'] == PROMPT
    eval_results = json.loads((pipeline['qformer'] / 'eval_results.json').read_text())
    assert {'eval_loss', 'eval_Bleu_4', 'eval_CIDEr'} <= eval_results.keys()
    events = list((pipeline['qformer'] / 'runs').rglob('events.out.tfevents.*'))
    assert events and all(event.stat().st_size > 0 for event in events)


def test_evaluation_scores_the_captions_the_trained_models_give(pipeline):
    metrics = json.loads((pipeline['evaluation'] / 'metrics.json').read_text())
    assert metrics['prompt'] == PROMPT  # read from the training output
    records = load_split(str(pipeline['data']), 'val')[:EVAL_IMAGES]
    frames = [load_rgb(pipeline['data'] / 'images' / record.file_name) for record in records]
    runs = {'model': (pipeline['base'], pipeline['lora']), 'baseline': (pipeline['qformer'], '')}
    for title, (model, adapter) in runs.items():
        scores = metrics['models'][title]['scores']
        for name in ('Bleu_1', 'Bleu_4', 'ROUGE_L', 'CIDEr', 'exact_match'):
            assert 0.0 <= scores[name] <= 10.0, (title, name)
        results = json.loads((pipeline['evaluation'] / f'results_{title}.json').read_text())
        assert [entry['image_id'] for entry in results] == [r.image_id for r in records]
        captioner = Blip2Captioner(CaptionerConfig(
            model=str(model), adapter=str(adapter), prompt=PROMPT,
            max_new_tokens=MAX_NEW_TOKENS))
        predictions = captioner.caption(frames)
        assert [entry['caption'] for entry in results] == predictions, title
        tokens = evaluate.simple_tokenize
        hits = [tokens(prediction) == tokens(record.captions[0])
                for prediction, record in zip(predictions, records)]
        assert scores['exact_match'] == pytest.approx(sum(hits) / len(hits)), title


def caption_over_dds(model, adapter, prompt, frame):
    """Start a CaptionNode on the trained output, publish ``frame``, return (caption, node)."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = peer = executor = None
    try:
        node = CaptionNode(context=context, parameter_overrides=[
            Parameter('model', value=str(model)), Parameter('adapter', value=str(adapter)),
            Parameter('prompt', value=prompt), Parameter('max_new_tokens', value=MAX_NEW_TOKENS),
            Parameter('image_topics', value=['/factory/camera'])])
        peer = rclpy.create_node('pipeline_camera', context=context)
        captions = []
        peer.create_subscription(String, '/blip2/caption',
                                 lambda message: captions.append(message.data), 10)
        publisher = peer.create_publisher(
            Image, '/factory/camera', QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        executor = MultiThreadedExecutor(num_threads=3, context=context)
        executor.add_node(node)
        executor.add_node(peer)
        threading.Thread(target=executor.spin, daemon=True).start()
        wait_for(lambda: publisher.get_subscription_count() > 0, TIMEOUT,
                 'the node to subscribe')
        wait_for(lambda: peer.count_publishers('/blip2/caption') > 0, TIMEOUT,
                 'the caption publisher')
        publisher.publish(image_message(frame, frame_id='factory_camera'))
        wait_for(lambda: captions, TIMEOUT, 'a caption')
        return captions[0], node.captioner.model.state_dict()
    finally:
        if executor is not None:
            executor.shutdown()
        for created in (node, peer):
            if created is not None:
                created.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.parametrize('method', ['lora', 'qformer'])
def test_trained_output_captions_frames_in_the_caption_node(pipeline, method):
    data = pipeline['data']
    record = load_split(str(data), 'val')[0]
    frame = load_rgb(data / 'images' / record.file_name)
    # What a user does: give the node the folder and the prompt training saved with it.
    prompt = json.loads((pipeline[method] / train.TRAINING_INFO_FILE).read_text())['prompt']
    if method == 'lora':
        model, adapter = pipeline['base'], pipeline['lora']
    else:
        model, adapter = pipeline['qformer'], ''

    caption, node_weights = caption_over_dds(model, adapter, prompt, frame)

    captioner = Blip2Captioner(CaptionerConfig(model=str(model), adapter=str(adapter),
                                               prompt=prompt, max_new_tokens=MAX_NEW_TOKENS))
    assert caption == captioner.caption([frame])[0]
    expected_weights = captioner.model.state_dict()
    base_weights = load_file(pipeline['base'] / 'model.safetensors')
    assert node_weights.keys() == expected_weights.keys()
    for name, tensor in node_weights.items():
        assert torch.equal(tensor, expected_weights[name]), name
    # The node runs the fine-tuned weights, not the base model it started from.
    changed = [name for name in base_weights
               if not torch.equal(node_weights[name], base_weights[name])]
    if method == 'lora':
        assert changed and all(name.startswith('language_model.') and
                               name.endswith(('q_proj.weight', 'v_proj.weight'))
                               for name in changed)
    else:
        assert changed and all(name.startswith(train.QFORMER_PREFIXES) for name in changed)
