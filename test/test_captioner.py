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
The inference core against the Hugging Face reference path, on tiny real BLIP-2 checkpoints.

Captions are compared on frames already at the model's input size, where the fast
preprocessing and the image processor agree to float rounding; preprocessing of other sizes is
checked on its own, with the tolerance stated at PIXEL_TOLERANCE_LEVELS.
"""

import json
import os
import shutil
import subprocess
import sys

from blip2_ros.captioner import Blip2Captioner, CaptionerConfig, ModelLoadError
from blip2_ros.decode import (keep_compiled_code, MAX_STATIC_CACHES, OneRowLinear,
                              use_one_row_reductions)
from blip2_ros.preprocess import resize_like_pil
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch
from training.tiny_blip2 import build_tiny_blip2
from transformers import (Blip2ForConditionalGeneration, Blip2Processor, OPTConfig,
                          OPTForCausalLM)

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'models', 'factory-tiny')
VQA_PROMPT = 'Question: is the conveyor empty? Answer:'
# Prompts of different token lengths, so a batch of them needs padding.
MIXED_PROMPTS = ['', 'a photo of', VQA_PROMPT, 'what is on the conveyor belt ?']

# The fast path resizes uint8 with torch's antialiased kernel, which reproduces PIL's integer
# resampling up to rounding: a pixel may land one uint8 level away from PIL's. After
# normalisation one level is (1/255)/std, largest for the smallest channel std.
PIXEL_TOLERANCE_LEVELS = 1
# Most pixels match exactly; the worst case measured is an 8-pixel checkerboard shrunk 30x
# (1080x1920 to 64x64), where 0.22 of a level is the mean difference.
MEAN_TOLERANCE_LEVELS = 0.3


def random_frame(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def structured_frame(height, width):
    """Gradients and an 8-pixel checkerboard: hard edges, the worst case for resampling."""
    rows, columns = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = columns * 255 // max(width - 1, 1)
    frame[..., 1] = rows * 255 // max(height - 1, 1)
    frame[..., 2] = ((columns // 8 + rows // 8) % 2) * 255
    return frame


def smooth_frame(height, width):
    """Slowly varying colours, like most of a real camera image."""
    rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [128 + 100 * np.sin(6 * columns + 2 * rows), 128 + 100 * np.cos(5 * rows),
                128 + 90 * np.sin(4 * (columns + rows))]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def save_processor_variant(folder, **image_processor_settings):
    """Rewrite the image processor settings of a saved checkpoint."""
    processor = Blip2Processor.from_pretrained(folder)
    for name, value in image_processor_settings.items():
        setattr(processor.image_processor, name, value)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope='module')
def lively_checkpoints(lively_opt_checkpoint, lively_t5_checkpoint):
    return {'opt': lively_opt_checkpoint, 't5': lively_t5_checkpoint}


@pytest.fixture(scope='module')
def preprocessing_checkpoints(tiny_opt_checkpoint, tiny_t5_checkpoint, tmp_path_factory):
    """Return the fixtures' checkpoints and ones with another input size, mean, std, filter."""
    root = tmp_path_factory.mktemp('preprocessing')
    t5_small = build_tiny_blip2(root / 't5-32', language_model='t5', image_size=32)
    save_processor_variant(t5_small, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    opt_bilinear = build_tiny_blip2(root / 'opt-48-bilinear', language_model='opt',
                                    image_size=48)
    save_processor_variant(opt_bilinear, image_mean=[0.485, 0.456, 0.406],
                           image_std=[0.229, 0.224, 0.225], resample=2)
    return {'opt-64': tiny_opt_checkpoint, 't5-64': tiny_t5_checkpoint,
            't5-32-mean0.5': t5_small, 'opt-48-bilinear-imagenet': opt_bilinear}


def make_captioner(folder, **settings):
    return Blip2Captioner(CaptionerConfig(model=str(folder), device='cpu', **settings))


def levels(difference, image_processor):
    """Convert a difference in normalised pixel values to uint8 levels of the worst channel."""
    return difference / ((1.0 / 255.0) / min(image_processor.image_std))


def reference_captions(folder, frames, prompts, max_new_tokens, encoder_decoder, model=None):
    """Caption the documented Hugging Face way: processor, generate, decode."""
    processor = Blip2Processor.from_pretrained(folder)
    processor.tokenizer.padding_side = 'right' if encoder_decoder else 'left'
    model = (model or Blip2ForConditionalGeneration.from_pretrained(folder)).eval()
    inputs = processor(images=frames, text=prompts, padding=True, return_tensors='pt')
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                num_beams=1)
    if not encoder_decoder:
        output = output[:, inputs['input_ids'].shape[1]:]
    return [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]


def model_size_frames(count, size=64, first_seed=100):
    return [random_frame(first_seed + index, size, size) for index in range(count)]


# ---------------------------------------------------------------------------------------------
# Preprocessing


PREPROCESSING_FRAMES = {
    'random-48x64': lambda size: random_frame(1, 48, 64),
    'structured-48x64': lambda size: structured_frame(48, 64),
    'random-480x640': lambda size: random_frame(2, 480, 640),
    'structured-480x640': lambda size: structured_frame(480, 640),
    'random-1080x1920': lambda size: random_frame(3, 1080, 1920),
    'structured-1080x1920': lambda size: structured_frame(1080, 1920),
    'random-model-size': lambda size: random_frame(4, size, size),
}


@pytest.mark.parametrize('frame_name', sorted(PREPROCESSING_FRAMES))
@pytest.mark.parametrize('checkpoint_name', ['opt-64', 't5-64', 't5-32-mean0.5',
                                             'opt-48-bilinear-imagenet'])
def test_preprocessing_matches_the_checkpoint_image_processor(
        preprocessing_checkpoints, checkpoint_name, frame_name):
    captioner = make_captioner(preprocessing_checkpoints[checkpoint_name])
    assert captioner.fast_preprocessing, 'these settings must take the fast path under test'
    image_processor = captioner.processor.image_processor
    size = captioner.image_size[0]
    frame = PREPROCESSING_FRAMES[frame_name](size)

    fast = captioner.preprocess([frame])
    reference = image_processor([frame], return_tensors='pt')['pixel_values']

    assert fast.shape == reference.shape == (1, 3, size, size)
    assert fast.dtype == torch.float32
    difference = (fast - reference).abs()
    assert levels(difference.max().item(), image_processor) <= PIXEL_TOLERANCE_LEVELS + 1e-3
    assert levels(difference.mean().item(), image_processor) <= MEAN_TOLERANCE_LEVELS
    if frame_name == 'random-model-size':
        # No resize: only the folded rescale-and-normalise, exact to float rounding.
        assert difference.max().item() < 1e-5


@pytest.mark.parametrize('height, width', [(640, 480), (104, 77), (300, 100)])
def test_preprocessing_of_tall_frames(preprocessing_checkpoints, height, width):
    # Pillow 13 resizes some tall images vertically first, the fast path (like Pillow before
    # it and torchvision) horizontally first. The order changes where bicubic overshoot gets
    # clipped: on smooth content that is a level or two, on noise up to 25 levels, so tall
    # frames are checked on smooth content, with a bound that still catches swapped axes.
    captioner = make_captioner(preprocessing_checkpoints['opt-64'])
    image_processor = captioner.processor.image_processor
    frame = smooth_frame(height, width)
    difference = (captioner.preprocess([frame])
                  - image_processor([frame], return_tensors='pt')['pixel_values']).abs()
    assert levels(difference.max().item(), image_processor) <= 2 + 1e-3
    assert levels(difference.mean().item(), image_processor) <= 0.05


@pytest.mark.parametrize('height, width, size', [
    (31, 17, 64), (48, 64, 64), (480, 640, 64), (1080, 1920, 224), (104, 77, 64),
    (300, 100, 224), (10, 300, 64), (48, 64, 224)])
@pytest.mark.parametrize('mode', ['bicubic', 'bilinear'])
def test_float_resize_used_on_gpus_matches_the_uint8_resize(height, width, size, mode):
    # GPUs have no uint8 antialiased kernel, so there the image is resized in float. Run that
    # code on the CPU and hold it to the uint8 kernel: at most one level apart, except two
    # when upscaling more than 3x, where the uint8 kernel's fixed-point weights round
    # differently (measured: bilinear 48x64 to 224x224, 6% of values one level off).
    image = torch.from_numpy(random_frame(7, height, width)).permute(2, 0, 1).unsqueeze(0)
    by_uint8 = resize_like_pil(image, (size, size), mode)
    by_float = resize_like_pil(image.float(), (size, size), mode)
    assert by_uint8.dtype == torch.uint8 and by_float.dtype == torch.float32
    assert torch.equal(by_float, by_float.round())
    difference = (by_float - by_uint8.float()).abs()
    large_upscale = max(size / height, size / width) > 3
    assert difference.max().item() <= (2 if large_upscale else 1)
    assert difference.mean().item() <= (0.1 if large_upscale else 0.02)


def test_preprocessing_takes_views_and_batches_frames_of_different_sizes(tiny_opt_checkpoint):
    captioner = make_captioner(tiny_opt_checkpoint)
    bgr = random_frame(5, 48, 64)
    rgb_view = bgr[..., ::-1]
    assert not rgb_view.flags['C_CONTIGUOUS']
    small, large = random_frame(6, 30, 40), random_frame(7, 480, 640)

    batch = captioner.preprocess([rgb_view, small, large])

    assert batch.shape == (3, 3, 64, 64)
    assert torch.equal(batch[0], captioner.preprocess([np.ascontiguousarray(rgb_view)])[0])
    assert torch.equal(batch[1], captioner.preprocess([small])[0])
    assert torch.equal(batch[2], captioner.preprocess([large])[0])


@pytest.mark.parametrize('bad_frame', [
    np.zeros((48, 64), np.uint8), np.zeros((48, 64, 4), np.uint8),
    np.zeros((48, 64, 3), np.float32)], ids=['grey', 'rgba', 'float'])
def test_preprocessing_rejects_frames_that_are_not_uint8_rgb(tiny_opt_checkpoint, bad_frame):
    captioner = make_captioner(tiny_opt_checkpoint)
    with pytest.raises(ValueError, match='HxWx3 uint8'):
        captioner.preprocess([bad_frame])


def test_settings_outside_the_fast_path_use_the_image_processor_itself(tmp_path):
    folder = build_tiny_blip2(tmp_path / 'lanczos', language_model='opt', image_size=32)
    save_processor_variant(folder, resample=1)  # PIL LANCZOS: no torch equivalent
    captioner = make_captioner(folder)
    assert not captioner.fast_preprocessing
    frame = random_frame(8, 48, 64)
    reference = captioner.processor.image_processor([frame], return_tensors='pt')
    assert torch.equal(captioner.preprocess([frame]), reference['pixel_values'])
    assert len(captioner.caption([frame], max_new_tokens=3)) == 1


# ---------------------------------------------------------------------------------------------
# Captions against the reference path


@pytest.mark.parametrize('language_model', ['opt', 't5'])
@pytest.mark.parametrize('prompt', ['', VQA_PROMPT], ids=['no-prompt', 'vqa-prompt'])
def test_captions_match_the_reference_path(lively_checkpoints, language_model, prompt):
    folder = lively_checkpoints[language_model]
    captioner = make_captioner(folder, max_new_tokens=8)
    frames = model_size_frames(4)

    single = captioner.caption(frames[:1], prompt=prompt)
    batch = captioner.caption(frames, prompt=prompt)

    encoder_decoder = language_model == 't5'
    assert single == reference_captions(folder, frames[:1], [prompt], 8, encoder_decoder)
    assert batch == reference_captions(folder, frames, [prompt] * 4, 8, encoder_decoder)
    assert batch[0] == single[0]
    assert len(set(batch)) > 1, 'the model must tell the frames apart for this to mean anything'


def test_prompt_changes_the_caption(lively_checkpoints):
    captioner = make_captioner(lively_checkpoints['opt'], max_new_tokens=8)
    frames = model_size_frames(3)
    assert captioner.caption(frames, prompt='') != captioner.caption(frames, prompt=VQA_PROMPT)
    captioner.config.prompt = VQA_PROMPT
    assert captioner.caption(frames) == captioner.caption(frames, prompt=VQA_PROMPT)


@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_batched_different_prompts_equal_captioning_each_frame_alone(
        lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    captioner = make_captioner(folder, max_new_tokens=8)
    frames = model_size_frames(len(MIXED_PROMPTS))

    batched = captioner.caption(frames, prompt=MIXED_PROMPTS)
    alone = [captioner.caption([frame], prompt=prompt)[0]
             for frame, prompt in zip(frames, MIXED_PROMPTS)]

    assert batched == alone
    assert batched == reference_captions(folder, frames, MIXED_PROMPTS, 8,
                                         language_model == 't5')
    assert captioner.processor.tokenizer.padding_side == (
        'right' if language_model == 't5' else 'left')


@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_padding_on_the_wrong_side_would_be_caught(lively_checkpoints, language_model):
    # Guards the test above: on these checkpoints, padding on the wrong side does change
    # captions, so equality there proves the side is right.
    captioner = make_captioner(lively_checkpoints[language_model], max_new_tokens=8)
    tokenizer = captioner.processor.tokenizer
    tokenizer.padding_side = 'left' if tokenizer.padding_side == 'right' else 'right'
    frames = model_size_frames(len(MIXED_PROMPTS))
    alone = [captioner.caption([frame], prompt=prompt)[0]
             for frame, prompt in zip(frames, MIXED_PROMPTS)]
    assert captioner.caption(frames, prompt=MIXED_PROMPTS) != alone


def test_prompt_count_must_match_frame_count(tiny_opt_checkpoint):
    captioner = make_captioner(tiny_opt_checkpoint)
    with pytest.raises(ValueError, match='2 prompts for 3 frames'):
        captioner.caption(model_size_frames(3), prompt=['a', 'b'])


def test_prompt_and_caption_longer_than_the_positions_of_opt_are_refused(tiny_opt_checkpoint):
    # The tiny OPT has 128 positions and 8 image tokens: 100 prompt words fit with 5 new tokens
    # and overflow with 30.
    long_prompt = ' '.join(['conveyor'] * 100)
    captioner = make_captioner(tiny_opt_checkpoint, max_new_tokens=5)
    assert captioner.length_problem(long_prompt, 5) is None
    assert len(captioner.caption(model_size_frames(1), prompt=long_prompt)) == 1
    problem = captioner.length_problem(long_prompt, 30)
    assert 'more than the 128 of the language model' in problem
    with pytest.raises(ValueError, match='need 139 positions'):
        captioner.caption(model_size_frames(1), prompt=long_prompt, max_new_tokens=30)
    # Configured that way, the captioner does not start.
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tiny_opt_checkpoint, prompt=long_prompt, max_new_tokens=30)
    assert_one_line(error, 'shorten the prompt or lower max_new_tokens')


def test_a_prompt_and_caption_that_fill_the_positions_of_opt_exactly_are_accepted(
        tiny_opt_checkpoint):
    # 8 image tokens, BOS and 100 prompt words take 109 of the 128 positions: 19 new tokens
    # fill them exactly, and such a caption runs to its end.
    long_prompt = ' '.join(['conveyor'] * 100)
    captioner = make_captioner(tiny_opt_checkpoint, max_new_tokens=19, prompt=long_prompt)
    assert captioner.length_problem(long_prompt, 19) is None
    assert 'need 129 positions' in captioner.length_problem(long_prompt, 20)
    forced = without_special_tokens(tiny_opt_checkpoint, max_new_tokens=19, prompt=long_prompt)
    (caption,) = forced.caption(model_size_frames(1))
    assert len(caption.split()) == 19


def test_t5_has_no_fixed_position_limit(tiny_t5_checkpoint):
    captioner = make_captioner(tiny_t5_checkpoint, max_new_tokens=5)
    long_prompt = ' '.join(['conveyor'] * 200)
    assert captioner.length_problem(long_prompt, 30) is None
    assert len(captioner.caption(model_size_frames(1), prompt=long_prompt)) == 1


@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_greedy_decoding_is_deterministic_and_position_independent(
        lively_checkpoints, language_model):
    captioner = make_captioner(lively_checkpoints[language_model], max_new_tokens=8)
    frames = model_size_frames(3) + [random_frame(9, 480, 640)]
    first = captioner.caption(frames)
    assert captioner.caption(frames) == first
    assert captioner.caption(frames[::-1]) == first[::-1]


@pytest.mark.parametrize('count', [0, 1, 5])
def test_a_batch_of_n_frames_gives_n_captions(tiny_t5_checkpoint, count):
    captioner = make_captioner(tiny_t5_checkpoint, max_new_tokens=4)
    captions = captioner.caption(model_size_frames(count))
    assert len(captions) == count
    assert all(isinstance(caption, str) for caption in captions)


@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_max_new_tokens_is_respected(lively_checkpoints, language_model):
    # The word-level tokenizer decodes one token to one space-separated word. Suppressing the
    # special tokens (end of sequence included) makes generation run to the limit, so the
    # count must be exact; without that, it is an upper bound.
    folder = lively_checkpoints[language_model]
    captioner = make_captioner(folder, max_new_tokens=5)
    forced = without_special_tokens(folder, max_new_tokens=5)
    frames = model_size_frames(3)
    for limit in (1, 3, 7):
        captions = forced.caption(frames, max_new_tokens=limit)
        assert [len(caption.split()) for caption in captions] == [limit] * 3
        free = captioner.caption(frames, max_new_tokens=limit)
        assert all(len(caption.split()) <= limit for caption in free)
    by_config = forced.caption(frames)
    assert [len(caption.split()) for caption in by_config] == [5] * 3


def test_max_new_tokens_below_1_is_refused(tiny_opt_checkpoint):
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tiny_opt_checkpoint, max_new_tokens=0)
    assert_one_line(error, 'max_new_tokens must be 1 or more, not 0')
    # 0 is not "the configured value": that would silently caption at another length.
    captioner = make_captioner(tiny_opt_checkpoint, max_new_tokens=2, cache='static')
    with pytest.raises(ValueError, match='max_new_tokens must be 1 or more, not 0'):
        captioner.caption(model_size_frames(1), max_new_tokens=0)


def test_static_cache_gives_the_same_captions(lively_checkpoints):
    frames = model_size_frames(3)
    dynamic = make_captioner(lively_checkpoints['opt'], max_new_tokens=6).caption(frames)
    static = make_captioner(lively_checkpoints['opt'], max_new_tokens=6,
                            cache='static').caption(frames)
    assert static == dynamic


# ---------------------------------------------------------------------------------------------
# The decode loop on the static cache, and its compiled step


def wrap(folder, model=None, **settings):
    """Return a captioner around ``model`` (default: the folder's), on the CPU."""
    model = model or Blip2ForConditionalGeneration.from_pretrained(folder)
    return Blip2Captioner.from_model(model, Blip2Processor.from_pretrained(folder),
                                     CaptionerConfig(**settings))


def without_special_tokens(folder, **settings):
    """
    Return a captioner whose model never picks a special token (end of sequence included).

    The checkpoint's generation config suppresses them, so decoding goes through generate()
    and runs to max_new_tokens, one word per token of the word-level tokenizer.
    """
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    special = Blip2Processor.from_pretrained(folder).tokenizer.all_special_ids
    model.language_model.generation_config.suppress_tokens = special
    return wrap(folder, model, **settings)


def refuse_generate(captioner):
    def generate(*args, **kwargs):
        raise AssertionError('generate() was called')
    captioner.model.generate = generate
    return captioner


def word_id(folder, caption):
    """Return the token id of the caption's most frequent word (the first in order on a tie)."""
    words = caption.split()
    tokenizer = Blip2Processor.from_pretrained(folder).tokenizer
    # sorted: a set's order changes with PYTHONHASHSEED, and so would the word of a tie.
    return tokenizer.convert_tokens_to_ids(max(sorted(set(words)), key=words.count))


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_the_decode_loop_ends_each_caption_at_its_own_end_token(
        lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=400)
    free = make_captioner(folder, max_new_tokens=10).caption(frames, prompt=MIXED_PROMPTS)
    # A word the captions use becomes the end token, so captions in one batch end at
    # different steps and the loop must pad the finished ones while the others go on.
    end = word_id(folder, ' '.join(free))
    models = []
    for _ in range(2):
        model = Blip2ForConditionalGeneration.from_pretrained(folder)
        model.language_model.generation_config.eos_token_id = end
        models.append(model)
    by_generate = wrap(folder, models[0], max_new_tokens=10)
    by_loop = refuse_generate(wrap(folder, models[1], max_new_tokens=10, cache='static'))
    assert by_loop.decode_loop and not by_generate.decode_loop
    ended = by_generate.caption(frames, prompt=MIXED_PROMPTS)
    assert by_loop.caption(frames, prompt=MIXED_PROMPTS) == ended
    lengths = {len(caption.split()) for caption in ended}
    assert len(lengths) > 1 and min(lengths) < 10, ended
    # min_new_tokens rules the end token out for that many tokens, as in generate().
    longer = by_generate.caption(frames, prompt=MIXED_PROMPTS, min_new_tokens=7)
    assert by_loop.caption(frames, prompt=MIXED_PROMPTS, min_new_tokens=7) == longer
    assert sum(map(len, longer)) > sum(map(len, ended)), (ended, longer)


@pytest.mark.usefixtures('one_torch_thread')
def test_the_decode_loop_stops_once_every_caption_has_ended(lively_checkpoints):
    # Captions padded to max_new_tokens read the same as captions that stopped, so only the
    # number of decode steps shows it: each step past the last end token is wasted latency.
    folder = lively_checkpoints['opt']
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=400)
    free = make_captioner(folder, max_new_tokens=10).caption(frames, prompt=MIXED_PROMPTS)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    words = ' '.join(free).split()
    end_word = max(sorted(set(words)), key=words.count)  # sorted: the same word every run
    model.language_model.generation_config.eos_token_id = word_id(folder, end_word)
    captioner = refuse_generate(wrap(folder, model, max_new_tokens=30, cache='static'))
    decode_step, steps = captioner.decoder._decode_step, []

    def counted_step(*args):
        steps.append(args)
        return decode_step(*args)

    captioner.decoder._decode_step = counted_step
    captions = captioner.caption(frames, prompt=MIXED_PROMPTS)
    assert all(caption.split()[-1] == end_word for caption in captions), captions
    # Every caption ended before the limit; running on to it takes 29 steps.
    assert len(steps) < 29, (len(steps), captions)


@pytest.mark.usefixtures('one_torch_thread')
def test_the_decode_loop_scores_one_position_per_caption(lively_checkpoints):
    # Only the last position's scores pick the next token, so the output embedding, OPT's
    # largest matrix, multiplies one row per caption: also over the prompt, as in generate().
    captioner = make_captioner(lively_checkpoints['opt'], max_new_tokens=6, cache='static')
    rows = []
    hook = captioner.model.language_model.get_output_embeddings().register_forward_hook(
        lambda layer, inputs, output: rows.append(inputs[0].shape[:-1]))
    try:
        captions = captioner.caption(model_size_frames(3), prompt=MIXED_PROMPTS[:3])
    finally:
        hook.remove()
    assert captioner.decode_loop and len(rows) == 6, rows
    assert set(rows) == {(3, 1)}, rows
    assert captions == make_captioner(lively_checkpoints['opt'], max_new_tokens=6).caption(
        model_size_frames(3), prompt=MIXED_PROMPTS[:3])


@pytest.mark.usefixtures('one_torch_thread')
def test_generation_settings_the_loop_lacks_send_decoding_to_generate(lively_checkpoints):
    # A checkpoint that asks for a repetition penalty decodes through generate(), which
    # honours it; captioning stays greedy even where its generation config asks for beams.
    folder = lively_checkpoints['opt']
    frames = model_size_frames(3, first_seed=420)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    model.language_model.generation_config.repetition_penalty = 3.0
    model.language_model.generation_config.num_beams = 3
    captioner = wrap(folder, model, max_new_tokens=10, cache='static')
    assert not captioner.decode_loop
    captions = captioner.caption(frames)
    model.language_model.generation_config.num_beams = 1
    assert captions == reference_captions(folder, frames, [''] * 3, 10, False, model=model)
    assert captions != wrap(folder, max_new_tokens=10).caption(frames)


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_the_compiled_decode_step_gives_generates_captions(lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=440)
    reference = make_captioner(folder, max_new_tokens=8)
    compiled = refuse_generate(make_captioner(folder, max_new_tokens=8, torch_compile=True))
    assert compiled.static_cache and compiled.decode_loop and compiled.compile_decode
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    compiled.warm_up([1, len(frames)])
    # One graph, the whole step (fullgraph: a graph break would raise): compiled, not eager.
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > graphs
    assert compiled.compile_decode
    for prompt in ('', MIXED_PROMPTS, VQA_PROMPT):
        expected = reference.caption(frames, prompt=prompt)
        assert compiled.caption(frames, prompt=prompt) == expected
        assert compiled.caption(frames[:1], prompt=prompt if isinstance(prompt, str)
                                else prompt[0]) == expected[:1]


def test_a_one_row_linear_compiles_to_a_reduction_and_computes_the_linear():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40, bias=False))
    use_one_row_reductions(layers)
    # Only layers with a bias: torch makes bias-free one-row products a reduction itself.
    assert [type(layer) for layer in layers] == [OneRowLinear, torch.nn.Linear]
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append({str(node.target) for node in graph_module.graph.nodes})
        return graph_module.forward

    for layer in (layers[0], OneRowLinear(64, 40, bias=False)):
        one, rows = torch.randn(1, 1, 64), torch.randn(3, 1, 64)
        compiled = torch.compile(layer, backend=record, fullgraph=True)
        expected = torch.nn.functional.linear(one, layer.weight, layer.bias)
        torch.testing.assert_close(compiled(one), expected)
        # One row: a product and a sum, no matmul. More rows: nn.Linear's matmul.
        assert any('sum' in target for target in graphs[-1]), graphs[-1]
        assert not any('linear' in target for target in graphs[-1]), graphs[-1]
        torch.testing.assert_close(compiled(rows),
                                   torch.nn.functional.linear(rows, layer.weight, layer.bias))
        assert any('linear' in target for target in graphs[-1]), graphs[-1]
        # Uncompiled it is nn.Linear, bit for bit.
        assert torch.equal(layer(one), expected)
        torch._dynamo.reset()
    use_one_row_reductions(layers, enable=False)
    assert [type(layer) for layer in layers] == [torch.nn.Linear, torch.nn.Linear]


@pytest.mark.usefixtures('one_torch_thread')
def test_the_compiled_decode_step_with_one_row_reductions_gives_the_same_captions(
        lively_checkpoints):
    # On GPUs the compiled captioner runs its language model's Linear layers with a bias (all
    # of OPT's) as OneRowLinear; the same compiled graphs, built for the CPU here, must caption
    # as nn.Linear does.
    folder = lively_checkpoints['opt']
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=520)
    reference = make_captioner(folder, max_new_tokens=8)
    compiled = refuse_generate(make_captioner(folder, max_new_tokens=8, torch_compile=True))
    use_one_row_reductions(compiled.model.language_model)
    swapped = [layer for layer in compiled.model.language_model.modules()
               if type(layer) is OneRowLinear]
    assert len(swapped) > 4, swapped
    for prompt in ('', MIXED_PROMPTS):
        expected = reference.caption(frames, prompt=prompt)
        single = prompt if isinstance(prompt, str) else prompt[0]
        assert compiled.caption(frames[:1], prompt=single) == expected[:1]
        assert compiled.caption(frames, prompt=prompt) == expected
    assert compiled.compile_decode


@pytest.mark.usefixtures('one_torch_thread')
def test_captioners_in_one_process_all_stay_compiled(lively_checkpoints):
    # Every captioner, model kind, batch size and prompt length is a compiled version of the
    # same functions; with torch's default limit of 8 versions per function the second T5
    # captioner here went uncompiled.
    torch._dynamo.reset()
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=500)
    for language_model in ('opt', 't5', 'opt', 't5'):
        folder = lively_checkpoints[language_model]
        captioner = make_captioner(folder, max_new_tokens=4, torch_compile=True)
        reference = make_captioner(folder, max_new_tokens=4)
        # Batch sizes and prompt lengths: shapes of their own.
        for prompt in ('', VQA_PROMPT, MIXED_PROMPTS):
            for count in (1, len(frames)):
                prompts = prompt[:count] if isinstance(prompt, list) else prompt
                expected = reference.caption(frames[:count], prompt=prompts)
                assert captioner.caption(frames[:count], prompt=prompts) == expected
        assert captioner.compile_decode, f'{language_model} fell back to uncompiled decoding'


@pytest.mark.usefixtures('one_torch_thread')
def test_a_step_that_cannot_be_compiled_runs_uncompiled_and_says_why(
        lively_checkpoints, monkeypatch, tmp_path, caplog):
    import torch._inductor.config
    # A machine without a C++ compiler: inductor cannot build the CPU step. A fresh compile
    # cache, so nothing compiled earlier is found instead.
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path))
    torch._dynamo.reset()
    folder = lively_checkpoints['opt']
    frames = model_size_frames(2, first_seed=460)
    captioner = make_captioner(folder, max_new_tokens=8, torch_compile=True)
    # torch's own patch: monkeypatch.setattr would delete these settings when it undoes them
    # (torch's config deletes on delattr), breaking every later compile in this process.
    no_compiler = {'cpp.cxx': (str(tmp_path / 'no-such-c++'),), 'fx_graph_cache': False}
    with caplog.at_level('ERROR', logger='blip2_ros.decode'), \
            torch._inductor.config.patch(no_compiler):
        captions = captioner.caption(frames, min_new_tokens=8)
    assert not captioner.compile_decode
    errors = [record.getMessage() for record in caplog.records
              if record.name == 'blip2_ros.decode']
    assert len(errors) == 1 and 'decoding uncompiled' in errors[0] and '\n' not in errors[0]
    assert 'compiler' in errors[0].lower(), errors[0]
    assert captions == make_captioner(folder, max_new_tokens=8).caption(
        frames, min_new_tokens=8)
    torch._dynamo.reset()


# A process that compiles a captioner once, as the node does at start-up, and says what it did.
COMPILE_ONCE = """
import json, sys
import numpy as np
import torch
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
captioner = Blip2Captioner(CaptionerConfig(model=sys.argv[1], device='cpu', max_new_tokens=4,
                                           torch_compile=True))
captioner.warm_up([1])
frame = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
counters = torch._dynamo.utils.counters['inductor']
print(json.dumps({'folder': captioner.compile_cache, 'caption': captioner.caption([frame]),
                  'compiled': captioner.compile_decode,
                  'hits': counters['fxgraph_cache_hit'],
                  'misses': counters['fxgraph_cache_miss']}))
"""


def test_compiled_code_is_kept_for_the_next_start(tiny_opt_checkpoint, tmp_path):
    # torch keeps it in the temporary folder, which a reboot empties: a robot would compile
    # for minutes at every start.
    environment = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), OMP_NUM_THREADS='1')
    environment.pop('TORCHINDUCTOR_CACHE_DIR', None)
    starts = []
    for _ in range(2):
        result = subprocess.run([sys.executable, '-c', COMPILE_ONCE, str(tiny_opt_checkpoint)],
                                env=environment, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        starts.append(json.loads(result.stdout.strip().splitlines()[-1]))
    folder = str(tmp_path / 'blip2_ros' / 'torch_compile')
    assert [start['folder'] for start in starts] == [folder, folder]
    assert all(start['compiled'] for start in starts)
    # The first start compiles and writes its code there; the second finds all of it.
    assert starts[0]['misses'] > 0 and os.listdir(folder)
    assert starts[1]['hits'] >= starts[0]['misses'] and starts[1]['misses'] == 0, starts
    assert starts[1]['caption'] == starts[0]['caption']


def test_the_compile_cache_folder_the_user_chose_wins(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'chosen'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert keep_compiled_code() == str(tmp_path / 'chosen')
    assert not (tmp_path / 'xdg').exists()


def test_a_compile_cache_folder_that_cannot_be_made_leaves_torchs_default(
        monkeypatch, tmp_path, caplog):
    # A read-only or odd home must not stop compiling.
    (tmp_path / 'not-a-folder').write_text('')
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'not-a-folder'))
    with caplog.at_level('INFO', logger='blip2_ros.decode'):
        assert keep_compiled_code() is None
    assert 'TORCHINDUCTOR_CACHE_DIR' not in os.environ
    assert any('not kept across reboots' in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------
# Loading


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert '\n' not in message and message.strip() == message
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'


def test_loads_a_local_folder_on_cpu_as_float32(tiny_opt_checkpoint):
    captioner = make_captioner(tiny_opt_checkpoint, dtype='auto')
    assert isinstance(captioner.model, Blip2ForConditionalGeneration)
    assert captioner.device == torch.device('cpu')
    assert captioner.dtype == torch.float32
    assert all(parameter.dtype == torch.float32 for parameter in captioner.model.parameters())
    assert not captioner.model.training
    assert captioner.preprocess(model_size_frames(1)).dtype == torch.float32


def test_bfloat16_on_cpu_when_asked(lively_checkpoints):
    captioner = make_captioner(lively_checkpoints['opt'], dtype='bfloat16', max_new_tokens=4)
    assert captioner.dtype == torch.bfloat16
    assert next(captioner.model.parameters()).dtype == torch.bfloat16
    assert captioner.preprocess(model_size_frames(1)).dtype == torch.bfloat16
    assert len(captioner.caption(model_size_frames(2))) == 2


def test_hub_id_missing_from_the_local_cache_is_one_clear_line():
    with pytest.raises(ModelLoadError) as error:
        make_captioner('acme-robotics/blip2-does-not-exist', local_files_only=True)
    assert_one_line(error, "'acme-robotics/blip2-does-not-exist'", 'local_files_only')


def test_missing_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / 'no-such-checkpoint'
    with pytest.raises(ModelLoadError) as error:
        make_captioner(missing)
    assert_one_line(error, str(missing), 'no such folder')


def test_folder_without_a_config_is_refused(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tmp_path / 'empty')
    assert_one_line(error, str(tmp_path / 'empty'))


@pytest.mark.parametrize('local_files_only', [True, False])
def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_one_clear_line(local_files_only):
    with pytest.raises(ModelLoadError) as error:
        make_captioner('foo bar', local_files_only=local_files_only)
    assert_one_line(error, "'foo bar'", 'no such folder, and not a valid hub id')


def truncate(path):
    """Cut a file to half its size, as an interrupted download or copy leaves it."""
    with open(path, 'r+b') as stream:
        stream.truncate(os.path.getsize(path) // 2)


def test_a_truncated_weight_file_is_one_clear_line(tiny_opt_checkpoint, tmp_path):
    folder = tmp_path / 'truncated'
    shutil.copytree(tiny_opt_checkpoint, folder)
    truncate(folder / 'model.safetensors')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(folder)
    assert_one_line(error, str(folder), 'model.safetensors is damaged',
                    'save the checkpoint again')


def test_a_checkpoint_without_its_tokenizer_files_is_refused(tiny_opt_checkpoint, tmp_path):
    # transformers would make a 2-token tokenizer without a pad token; captions would be
    # garbage, or the first batch would fail on padding.
    folder = tmp_path / 'no-tokenizer'
    shutil.copytree(tiny_opt_checkpoint, folder)
    os.remove(folder / 'tokenizer.json')
    os.remove(folder / 'tokenizer_config.json')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(folder)
    assert_one_line(error, str(folder), 'lacks its processor files', 'tokenizer.json',
                    'tokenizer_config.json')


def test_small_word_level_tokenizers_of_the_tiny_and_demo_models_are_accepted(
        tiny_t5_checkpoint):
    # Their whole vocabularies are a few dozen words, as big as their language models' tables.
    for folder in (tiny_t5_checkpoint, DEMO_MODEL):
        captioner = make_captioner(folder, max_new_tokens=2)
        assert len(captioner.caption(model_size_frames(1))) == 1


def edit_json(path, edit):
    with open(path, encoding='utf-8') as stream:
        content = json.load(stream)
    edit(content)
    with open(path, 'w', encoding='utf-8') as stream:
        json.dump(content, stream)


@pytest.mark.parametrize('file_name, edit', [
    ('processor_config.json', lambda config: config['image_processor'].update(resample='cubic')),
    ('generation_config.json', lambda config: config.update(pad_token_id='none'))],
    ids=['resample-text', 'pad-token-text'])
def test_processor_or_generation_settings_that_do_not_work_are_one_clear_line(
        tiny_opt_checkpoint, tmp_path, file_name, edit):
    folder = tmp_path / 'bad-settings'
    shutil.copytree(tiny_opt_checkpoint, folder)
    edit_json(folder / file_name, edit)
    with pytest.raises(ModelLoadError) as error:
        make_captioner(folder)
    assert_one_line(error, str(folder))


@pytest.fixture(scope='module')
def pickle_only_checkpoint(lively_checkpoints, tmp_path_factory):
    """Copy the lively OPT checkpoint with its weights in pytorch_model.bin (a pickle) only."""
    # transformers 5 ignores safe_serialization=False, so write the legacy file by hand.
    folder = tmp_path_factory.mktemp('pickle') / 'opt-bin'
    shutil.copytree(lively_checkpoints['opt'], folder)
    weights = load_file(folder / 'model.safetensors')
    os.remove(folder / 'model.safetensors')
    torch.save(weights, folder / 'pytorch_model.bin')
    return folder


def test_pickle_weights_are_refused_unless_allowed(pickle_only_checkpoint, lively_checkpoints):
    with pytest.raises(ModelLoadError) as error:
        make_captioner(pickle_only_checkpoint)
    assert_one_line(error, str(pickle_only_checkpoint), 'allow_pickle')

    frames = model_size_frames(3)
    from_pickle = make_captioner(pickle_only_checkpoint, allow_pickle=True, max_new_tokens=6)
    from_safetensors = make_captioner(lively_checkpoints['opt'], max_new_tokens=6)
    assert from_pickle.caption(frames) == from_safetensors.caption(frames)


def test_allow_pickle_still_loads_safetensors_checkpoints(lively_checkpoints):
    captioner = make_captioner(lively_checkpoints['opt'], allow_pickle=True)
    assert len(captioner.caption(model_size_frames(1))) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on a machine without GPU')
def test_cuda_without_a_gpu_is_refused(tiny_opt_checkpoint):
    with pytest.raises(ModelLoadError) as error:
        Blip2Captioner(CaptionerConfig(model=str(tiny_opt_checkpoint), device='cuda'))
    assert_one_line(error, "'cuda'", 'cpu')


@pytest.mark.parametrize('device', ['gpu', 'cuda:x', f'cuda:{torch.cuda.device_count()}'])
def test_unknown_or_absent_devices_are_refused(tiny_opt_checkpoint, device):
    with pytest.raises(ModelLoadError) as error:
        Blip2Captioner(CaptionerConfig(model=str(tiny_opt_checkpoint), device=device))
    assert_one_line(error, f"'{device}'")


def test_unknown_dtype_is_refused(tiny_opt_checkpoint):
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tiny_opt_checkpoint, dtype='fp8')
    assert_one_line(error, "'fp8'", 'bfloat16', 'float32')


def test_float16_is_refused_for_flan_t5(tiny_t5_checkpoint):
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tiny_t5_checkpoint, dtype='float16')
    assert_one_line(error, 'float16', 'bfloat16')


def test_a_model_that_is_not_blip2_is_refused(tmp_path):
    folder = tmp_path / 'plain-opt'
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                             num_attention_heads=2, word_embed_proj_dim=16,
                             max_position_embeddings=32)).save_pretrained(folder)
    with pytest.raises(ModelLoadError) as error:
        make_captioner(folder)
    assert_one_line(error, str(folder), "model_type 'opt', so it is not BLIP-2")


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def perturb_lora(model, seed=3):
    """Give the LoRA B matrices, which start at zero (a no-op adapter), values that matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if 'lora_B' in name:
                parameter.normal_(0.0, 0.5, generator=generator)


def forward_logits(model, processor, frames, prompt=''):
    inputs = processor(images=frames, text=[prompt] * len(frames), padding=True,
                       return_tensors='pt')
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope='module')
def adapters(lively_checkpoints, tmp_path_factory):
    """
    Save LoRA adapters in both forms; return each folder with the model it was saved from.

    'language_model': get_peft_model on the language model alone; its keys have no
    ``language_model.`` prefix. 'whole_model': get_peft_model on Blip2ForConditionalGeneration
    with target_modules restricted to the language model's attention, as the training tools do.
    """
    from peft import get_peft_model, LoraConfig
    root = tmp_path_factory.mktemp('adapters')
    base = lively_checkpoints['opt']
    result = {}

    language_only = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    peft_language_model = get_peft_model(
        language_only.language_model, LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))
    perturb_lora(peft_language_model, seed=3)
    peft_language_model.save_pretrained(root / 'language_model')
    # get_peft_model injected the LoRA layers into language_only in place.
    result['language_model'] = (root / 'language_model', language_only)

    whole = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    peft_whole = get_peft_model(whole, LoraConfig(
        r=4, target_modules=r'.*language_model.*\.(q_proj|v_proj)'))
    perturb_lora(peft_whole, seed=4)
    peft_whole.save_pretrained(root / 'whole_model')
    result['whole_model'] = (root / 'whole_model', peft_whole)
    return result


def test_whole_model_adapter_keys_sit_under_language_model(adapters):
    keys = list(load_file(adapters['whole_model'][0] / 'adapter_model.safetensors'))
    assert keys and all(key.startswith('base_model.model.language_model.') for key in keys)
    keys = list(load_file(adapters['language_model'][0] / 'adapter_model.safetensors'))
    assert keys and all(key.startswith('base_model.model.model.decoder.') for key in keys)


@pytest.mark.parametrize('form', ['language_model', 'whole_model'])
def test_adapter_gives_the_peft_model_outputs(lively_checkpoints, adapters, form):
    folder, peft_model = adapters[form]
    base = make_captioner(lively_checkpoints['opt'], max_new_tokens=8)
    adapted = make_captioner(lively_checkpoints['opt'], adapter=str(folder), max_new_tokens=8)
    processor = adapted.processor
    frames = model_size_frames(4)

    expected = forward_logits(peft_model, processor, frames)
    merged = forward_logits(adapted.model, processor, frames)
    assert torch.allclose(merged, expected, atol=1e-4, rtol=1e-4)
    assert (merged - forward_logits(base.model, processor, frames)).abs().max() > 0.1

    inputs = processor(images=frames, text=[''] * 4, padding=True, return_tensors='pt')
    with torch.no_grad():
        output = peft_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    output = output[:, inputs['input_ids'].shape[1]:]
    expected_captions = [text.strip() for text in
                         processor.batch_decode(output, skip_special_tokens=True)]
    captions = adapted.caption(frames)
    assert captions == expected_captions
    assert captions != base.caption(frames)


def test_adapter_weights_that_fit_no_layer_are_refused(lively_checkpoints, adapters, tmp_path):
    # peft only warns about such an adapter and runs the base model; a robot must not.
    folder = tmp_path / 'shifted'
    shutil.copytree(adapters['whole_model'][0], folder)
    weights = load_file(folder / 'adapter_model.safetensors')
    weights = {key.replace('layers.1.', 'layers.7.'): value for key, value in weights.items()}
    save_file(weights, folder / 'adapter_model.safetensors')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(lively_checkpoints['opt'], adapter=str(folder))
    assert_one_line(error, str(folder), 'does not fit')


def test_adapter_for_another_architecture_is_refused(lively_checkpoints, adapters):
    with pytest.raises(ModelLoadError) as error:
        make_captioner(lively_checkpoints['t5'], adapter=str(adapters['whole_model'][0]))
    assert_one_line(error, str(adapters['whole_model'][0]))


def test_pickle_adapter_is_refused_unless_allowed(lively_checkpoints, adapters, tmp_path):
    source, peft_model = adapters['whole_model']
    folder = tmp_path / 'pickle-adapter'
    shutil.copytree(source, folder)
    torch.save(load_file(folder / 'adapter_model.safetensors'), folder / 'adapter_model.bin')
    os.remove(folder / 'adapter_model.safetensors')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(lively_checkpoints['opt'], adapter=str(folder))
    assert_one_line(error, str(folder), 'allow_pickle')

    adapted = make_captioner(lively_checkpoints['opt'], adapter=str(folder), allow_pickle=True)
    frames = model_size_frames(2)
    assert torch.allclose(forward_logits(adapted.model, adapted.processor, frames),
                          forward_logits(peft_model, adapted.processor, frames),
                          atol=1e-4, rtol=1e-4)


def test_prompt_learning_adapter_is_refused(lively_checkpoints, tmp_path):
    from peft import get_peft_model, PromptTuningConfig
    model = Blip2ForConditionalGeneration.from_pretrained(lively_checkpoints['opt'])
    prompt_tuning = get_peft_model(model.language_model, PromptTuningConfig(
        task_type='CAUSAL_LM', num_virtual_tokens=4))
    prompt_tuning.save_pretrained(tmp_path / 'prompt-tuning')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(lively_checkpoints['opt'], adapter=str(tmp_path / 'prompt-tuning'))
    assert_one_line(error, 'prompt-learning', 'LoRA')
    assert 'cannot apply' not in str(error.value)


def test_a_truncated_adapter_file_is_one_clear_line(lively_checkpoints, adapters, tmp_path):
    folder = tmp_path / 'truncated-adapter'
    shutil.copytree(adapters['whole_model'][0], folder)
    truncate(folder / 'adapter_model.safetensors')
    with pytest.raises(ModelLoadError) as error:
        make_captioner(lively_checkpoints['opt'], adapter=str(folder))
    assert_one_line(error, str(folder), 'damaged weight file', 'save or copy the adapter again')


@pytest.mark.parametrize('layout', ['missing', 'empty'])
def test_adapter_folder_without_an_adapter_is_refused(tiny_opt_checkpoint, tmp_path, layout):
    folder = tmp_path / 'adapter'
    if layout == 'empty':
        folder.mkdir()
    with pytest.raises(ModelLoadError) as error:
        make_captioner(tiny_opt_checkpoint, adapter=str(folder))
    assert_one_line(error, str(folder))


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped on the CPU-only CI machines; run by hand where a GPU is at hand)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@needs_cuda
@pytest.mark.parametrize('frame_name', sorted(PREPROCESSING_FRAMES))
def test_gpu_preprocessing_matches_the_image_processor(tiny_opt_checkpoint, frame_name):
    captioner = make_captioner(tiny_opt_checkpoint)
    captioner_gpu = Blip2Captioner(CaptionerConfig(
        model=str(tiny_opt_checkpoint), device='cuda', dtype='float32'))
    image_processor = captioner.processor.image_processor
    frame = PREPROCESSING_FRAMES[frame_name](64)
    reference = image_processor([frame], return_tensors='pt')['pixel_values']
    difference = (captioner_gpu.preprocess([frame]).cpu() - reference).abs()
    assert levels(difference.max().item(), image_processor) <= PIXEL_TOLERANCE_LEVELS + 1e-3
    assert levels(difference.mean().item(), image_processor) <= MEAN_TOLERANCE_LEVELS


@needs_cuda
def test_gpu_auto_dtype_is_a_16_bit_float_and_captions(lively_checkpoints):
    gpu = Blip2Captioner(CaptionerConfig(model=str(lively_checkpoints['opt']), device='auto',
                                         max_new_tokens=8))
    assert gpu.device.type == 'cuda'
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert gpu.dtype == expected
    assert next(gpu.model.parameters()).dtype == expected
    frames = model_size_frames(4) + [random_frame(10, 1080, 1920)]
    captions = gpu.caption(frames, prompt=MIXED_PROMPTS + [''])
    assert len(captions) == 5 and all(isinstance(caption, str) for caption in captions)


@pytest.fixture
def exact_cuda_float32():
    """Turn TF32 off (cuDNN convolutions use it by default) so CPU and GPU can be compared."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_gpu_float32_captions_equal_cpu_captions(lively_checkpoints, exact_cuda_float32,
                                                 language_model):
    folder = str(lively_checkpoints[language_model])
    frames = model_size_frames(len(MIXED_PROMPTS))
    cpu = make_captioner(folder, max_new_tokens=8).caption(frames, prompt=MIXED_PROMPTS)
    gpu = Blip2Captioner(CaptionerConfig(model=folder, device='cuda', dtype='float32',
                                         max_new_tokens=8))
    assert gpu.caption(frames, prompt=MIXED_PROMPTS) == cpu


@needs_cuda
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_gpu_cuda_graph_decode_loop_captions_equal_cpu_captions(
        lively_checkpoints, exact_cuda_float32, language_model):
    folder = str(lively_checkpoints[language_model])
    frames = model_size_frames(len(MIXED_PROMPTS), first_seed=480)
    cpu = make_captioner(folder, max_new_tokens=8)
    gpu = refuse_generate(Blip2Captioner(CaptionerConfig(
        model=folder, device='cuda', dtype='float32', max_new_tokens=8, torch_compile=True)))
    skips = torch._dynamo.utils.counters['inductor']['cudagraph_skips']
    gpu.warm_up([1, len(frames)])
    assert gpu.compile_decode, 'the decode step fell back to eager'
    # torch compiles but runs without a CUDA graph when it finds one unsafe, with a warning.
    assert torch._dynamo.utils.counters['inductor']['cudagraph_skips'] == skips
    # Calls after calls: a caption must not read a CUDA graph output the next replay overwrote.
    for prompt in (MIXED_PROMPTS, '', VQA_PROMPT, MIXED_PROMPTS):
        expected = cpu.caption(frames, prompt=prompt)
        assert gpu.caption(frames, prompt=prompt) == expected
        assert gpu.caption(frames[1:2], prompt='') == cpu.caption(frames[1:2], prompt='')


# ---------------------------------------------------------------------------------------------
# Reused static cache, wrapping a model in memory, warm-up

# Consecutive calls: batch sizes come and go, a shape comes back with another prompt (another
# input length in the same rounded cache length) and then with new frames and the same prompt.
STATIC_CACHE_CALLS = [
    (1, ''), (2, 'a photo of'), (3, MIXED_PROMPTS[:3]), (1, VQA_PROMPT), (2, 'a photo of'),
    (3, ['what is on the conveyor belt ?', '', 'a photo of']), (2, ''), (1, ''),
]


def static_caches(captioner):
    """Return the identities of the static KV caches the captioner holds."""
    return {id(cache) for cache in captioner.decoder.static_caches.values()}


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_reused_static_caches_give_the_dynamic_captions_call_after_call(
        lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    dynamic = make_captioner(folder, max_new_tokens=6)
    static = make_captioner(folder, max_new_tokens=6, cache='static')
    captions = []
    seen = set()
    for call, (count, prompt) in enumerate(STATIC_CACHE_CALLS):
        # New frames on every call, so a cache that kept the last call's keys and values
        # (T5's cross-attention above all) would caption the wrong images.
        frames = model_size_frames(count, first_seed=200 + 10 * call)
        before = static_caches(static)
        expected = dynamic.caption(frames, prompt=prompt)
        assert static.caption(frames, prompt=prompt) == expected, f'call {call}'
        captions += expected
        if (count, str(prompt)) in seen:
            assert static_caches(static) == before, f'call {call} allocated a cache again'
        seen.add((count, str(prompt)))
    assert len(set(captions)) > 3, 'captions must differ between calls to mean anything'
    assert len(static.decoder.static_caches) >= 3 and not dynamic.decoder.static_caches


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_a_batch_shape_reuses_its_static_cache(lively_checkpoints, language_model):
    captioner = make_captioner(lively_checkpoints[language_model], max_new_tokens=6,
                               cache='static')
    captioner.caption(model_size_frames(2), prompt='a photo of')
    first = static_caches(captioner)
    assert len(first) == 1
    captioner.caption(model_size_frames(2, first_seed=300), prompt='a photo of')
    assert static_caches(captioner) == first
    captioner.caption(model_size_frames(3), prompt='a photo of')
    assert len(static_caches(captioner)) == 2 and first < static_caches(captioner)

    cache, length = captioner.decoder.static_cache_for(2, 40, 6)
    assert captioner.decoder.static_cache_for(2, 40, 6) == (cache, length)
    assert captioner.decoder.static_cache_for(3, 40, 6)[0] is not cache
    # Rounded up, so that a slightly longer prompt reuses the same cache.
    assert length % 16 == 0 and length >= (6 + 1 if language_model == 't5' else 40 + 6)
    # T5's cross-attention cache holds exactly the encoder's input.
    reused = captioner.decoder.static_cache_for(2, 41, 6)[0] is cache
    assert reused == (language_model == 'opt')


def cache_layers(cache):
    """Return the layers of a static KV cache, T5's self- and cross-attention ones alike."""
    parts = getattr(cache, 'self_attention_cache', None), getattr(
        cache, 'cross_attention_cache', None)
    return [layer for part in (parts if parts[0] else (cache,)) for layer in part.layers]


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_static_cache_tensors_exist_before_the_first_forward_pass(
        lively_checkpoints, language_model, monkeypatch):
    # A compiled prefill is the first forward pass on a new cache. Had the cache made its
    # tensors there (transformers' lazy default), on a GPU they would belong to the prefill's
    # CUDA graph, and its next replay would overwrite them. So each cache's tensors must be
    # made when the cache is, and the forward passes must write into those very tensors.
    captioner = make_captioner(lively_checkpoints[language_model], max_new_tokens=6,
                               cache='static')
    handed_out = []
    make_cache = captioner.decoder.static_cache_for

    def recording_static_cache_for(*args):
        cache, length = make_cache(*args)
        layers = cache_layers(cache)
        assert layers and all(layer.is_initialized for layer in layers), 'made lazily'
        handed_out.append((cache, [(layer.keys.data_ptr(), layer.values.data_ptr())
                                   for layer in layers]))
        return cache, length

    monkeypatch.setattr(captioner.decoder, 'static_cache_for', recording_static_cache_for)
    frames = model_size_frames(2, first_seed=500)
    captions = captioner.caption(frames, prompt='a photo of')
    (cache, addresses), = handed_out
    layers = cache_layers(cache)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers] == addresses
    assert all(bool(layer.keys.any()) and bool(layer.values.any()) for layer in layers)
    language_model_dtype = captioner.model.language_model.dtype
    assert {layer.keys.dtype for layer in layers} == {language_model_dtype}
    # A second call resets the same tensors in place and captions as the first did.
    assert captioner.caption(frames, prompt='a photo of') == captions
    assert handed_out[1][0] is cache and handed_out[1][1] == addresses


@pytest.mark.usefixtures('one_torch_thread')
def test_static_caches_are_bounded_and_the_least_recently_used_goes_first(lively_checkpoints):
    # A node that sees many batch shapes must not keep a KV cache for each forever.
    captioner = make_captioner(lively_checkpoints['opt'], max_new_tokens=4, cache='static')
    frames = model_size_frames(MAX_STATIC_CACHES + 2)
    for count in range(1, MAX_STATIC_CACHES + 1):
        captioner.caption(frames[:count])
    assert len(captioner.decoder.static_caches) == MAX_STATIC_CACHES
    captioner.caption(frames[:1])  # used again: now the most recent
    captioner.caption(frames[:MAX_STATIC_CACHES + 1])
    assert len(captioner.decoder.static_caches) == MAX_STATIC_CACHES
    # The batch of 2 was the least recently used.
    assert sorted(key[0] for key in captioner.decoder.static_caches) == [1] + list(
        range(3, MAX_STATIC_CACHES + 2))


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_from_model_captions_as_loading_the_folder_does(lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    frames = model_size_frames(len(MIXED_PROMPTS))
    loaded = make_captioner(folder, max_new_tokens=8)
    # A processor as from_pretrained gives it: its padding side is the tokenizer's default,
    # which from_model must set for the model kind just as loading does.
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    wrapped = Blip2Captioner.from_model(model, Blip2Processor.from_pretrained(folder),
                                        CaptionerConfig(max_new_tokens=8))
    assert wrapped.model is model
    assert (wrapped.device, wrapped.dtype) == (torch.device('cpu'), torch.float32)
    assert wrapped.is_encoder_decoder == (language_model == 't5')
    expected = loaded.caption(frames, prompt=MIXED_PROMPTS)
    assert wrapped.caption(frames, prompt=MIXED_PROMPTS) == expected
    assert len(set(expected)) > 1


@pytest.mark.usefixtures('one_torch_thread')
def test_from_model_without_a_config_and_with_a_bad_cache(lively_checkpoints):
    folder = lively_checkpoints['opt']
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    processor = Blip2Processor.from_pretrained(folder)
    wrapped = Blip2Captioner.from_model(model, processor)
    assert wrapped.config.model == str(folder)
    assert wrapped.caption(model_size_frames(2), max_new_tokens=8) == make_captioner(
        folder, max_new_tokens=8).caption(model_size_frames(2))
    with pytest.raises(ModelLoadError) as error:
        Blip2Captioner.from_model(model, processor, CaptionerConfig(cache='paged'))
    assert_one_line(error, 'paged')


@pytest.mark.usefixtures('one_torch_thread')
@pytest.mark.parametrize('language_model', ['opt', 't5'])
def test_warm_up_leaves_later_captions_unchanged(lively_checkpoints, language_model):
    folder = lively_checkpoints[language_model]
    frames = model_size_frames(len(MIXED_PROMPTS))
    fresh = make_captioner(folder, max_new_tokens=6, prompt=VQA_PROMPT)
    expected_one = fresh.caption(frames[:1])
    expected_two = fresh.caption(frames[1:3])
    expected_mixed = fresh.caption(frames, prompt=MIXED_PROMPTS)
    for cache in ('dynamic', 'static'):
        captioner = make_captioner(folder, max_new_tokens=6, prompt=VQA_PROMPT, cache=cache)
        captioner.warm_up([1, 2])
        warmed = static_caches(captioner)
        assert len(warmed) == (2 if cache == 'static' else 0)
        assert captioner.caption(frames[:1]) == expected_one
        assert captioner.caption(frames[1:3]) == expected_two
        # The configured prompt and batch sizes were warmed up: their caches are the ones used.
        assert static_caches(captioner) == warmed
        assert captioner.caption(frames, prompt=MIXED_PROMPTS) == expected_mixed
        assert captioner.config.max_new_tokens == 6 and captioner.config.prompt == VQA_PROMPT


@pytest.mark.usefixtures('one_torch_thread')
def test_warm_up_with_a_prompt_prepares_that_prompt(lively_checkpoints):
    captioner = make_captioner(lively_checkpoints['opt'], max_new_tokens=6, cache='static')
    captioner.warm_up([2], prompt=VQA_PROMPT)
    warmed = static_caches(captioner)
    assert len(warmed) == 1
    frames = model_size_frames(2)
    captions = captioner.caption(frames, prompt=VQA_PROMPT)
    assert static_caches(captioner) == warmed
    assert captions == make_captioner(lively_checkpoints['opt'], max_new_tokens=6).caption(
        frames, prompt=VQA_PROMPT)
