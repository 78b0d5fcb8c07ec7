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

"""caption_images on real image files: a real webcam JPEG and frame from a public bag, and more."""

import json
import os
from pathlib import Path
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import warnings
import zlib

from blip2_ros.caption_images import find_images, ImageLoadError, load_rgb, main
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
import cv2
import numpy as np
from PIL import Image
import pytest
from rosbags.typesys import get_typestore, Stores
import torch
from transformers.image_transforms import convert_to_rgb

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get(
    'BLIP2_ROS_REALDATA', Path(__file__).resolve().parents[2] / 'shared' / 'realdata'))
WEBCAM_BAG = REALDATA / 'ros2' / 'klintan_rosbag2js' / 'sample.db3'
EXIF_ORIENTATION = 0x0112


def random_frame(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def read_webcam_bag():
    """Return the real JPEG bytes and the real bgr8 frame of the 2019 webcam bag."""
    if not WEBCAM_BAG.is_file():
        pytest.fail(f'real test bag not found at {WEBCAM_BAG}; set BLIP2_ROS_REALDATA')
    typestore = get_typestore(Stores.ROS2_KILTED)
    database = sqlite3.connect(f'file:{WEBCAM_BAG}?mode=ro', uri=True)
    try:
        def payload(topic):
            row = database.execute(
                'SELECT m.data FROM messages m JOIN topics t ON m.topic_id = t.id '
                'WHERE t.name = ?', (topic,)).fetchone()
            return bytes(row[0])
        jpeg = typestore.deserialize_cdr(payload('/image/compressed'),
                                         'sensor_msgs/msg/CompressedImage')
        raw = typestore.deserialize_cdr(payload('/image'), 'sensor_msgs/msg/Image')
    finally:
        database.close()
    bgr = np.frombuffer(bytes(raw.data), np.uint8).reshape(raw.height, raw.width, 3)
    return bytes(jpeg.data), bgr


@pytest.fixture
def image_folder(tmp_path):
    """
    Write a folder tree of real image files and return it with the frames of its PNGs.

    PNGs, JPEGs (upper-case extension too), a real webcam JPEG and the real raw webcam frame as
    PNG, a corrupt JPEG, and a text file that is not an image.
    """
    root = tmp_path / 'images'
    (root / 'shift_b').mkdir(parents=True)
    (root / 'shift_a').mkdir()
    frames = {}

    def write_png(relative, rgb):
        assert cv2.imwrite(str(root / relative), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames[relative] = rgb

    write_png('belt.png', random_frame(1, 48, 64))
    write_png('shift_b/arm.png', random_frame(2, 120, 90))
    write_png('shift_a/z_last.png', random_frame(3, 64, 64))
    Image.fromarray(random_frame(4, 80, 100)).save(root / 'shift_a/box.JPG', quality=90)
    jpeg, webcam_bgr = read_webcam_bag()
    (root / 'webcam.jpg').write_bytes(jpeg)
    write_png('webcam_raw.png', cv2.cvtColor(webcam_bgr, cv2.COLOR_BGR2RGB))
    (root / 'shift_b/broken.jpg').write_bytes(jpeg[:2000])  # a JPEG cut off mid-scan
    (root / 'shift_b/notes.txt').write_text('not an image')
    return root, frames


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_find_images_is_recursive_sorted_and_filtered(image_folder):
    root, _ = image_folder
    images, problems = find_images([str(root), str(root / 'belt.png'), str(root / 'nope')])
    relative = [os.path.relpath(path, root) for path in images]
    assert relative == ['belt.png', 'shift_a/box.JPG', 'shift_a/z_last.png',
                        'shift_b/arm.png', 'shift_b/broken.jpg', 'webcam.jpg',
                        'webcam_raw.png']
    assert problems == [f'{root / "nope"}: no such file or folder']
    # A file named explicitly is taken whatever its extension.
    notes = str(root / 'shift_b/notes.txt')
    assert find_images([notes]) == ([notes], [])


def test_load_rgb_reads_png_exactly_and_jpeg_in_rgb_order(image_folder):
    root, frames = image_folder
    assert np.array_equal(load_rgb(str(root / 'belt.png')), frames['belt.png'])
    webcam_png = load_rgb(str(root / 'webcam_raw.png'))
    assert webcam_png.shape == (480, 640, 3) and webcam_png.flags['C_CONTIGUOUS']
    # The JPEG holds another frame of the same scene; OpenCV decodes it independently. Channel
    # order matters: swapped red and blue would be far off on a face.
    webcam_jpeg = load_rgb(str(root / 'webcam.jpg'))
    by_opencv = cv2.cvtColor(cv2.imread(str(root / 'webcam.jpg')), cv2.COLOR_BGR2RGB)
    assert webcam_jpeg.dtype == np.uint8 and webcam_jpeg.shape == (480, 640, 3)
    assert np.abs(webcam_jpeg.astype(int) - by_opencv).mean() < 1.0
    assert np.abs(webcam_jpeg.astype(int) - by_opencv[..., ::-1]).mean() > 5.0


def test_load_rgb_turns_images_upright_by_their_exif_orientation(tmp_path):
    frame = random_frame(5, 30, 50)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways: rotate 90 degrees clockwise to view
    path = tmp_path / 'sideways.png'
    Image.fromarray(frame).save(path, exif=exif)
    assert np.array_equal(load_rgb(str(path)), np.rot90(frame, k=-1))


def exif_with_a_mistyped_tag():
    """
    Return raw EXIF: orientation 6 and a TileLength tag that holds text instead of a number.

    PIL reads such a block, but turning the image upright rewrites the EXIF without the
    orientation, and packing the text as a number raises struct.error.
    """
    entries = [(0x0112, 3, 1, struct.pack('>HH', 6, 0)),  # SHORT orientation 6
               (0x0143, 2, 4, b'cam\0')]  # TileLength as ASCII
    ifd = struct.pack('>H', len(entries)) + b''.join(
        struct.pack('>HHI', tag, kind, count) + value for tag, kind, count, value in entries)
    return b'Exif\0\0MM\0*' + struct.pack('>I', 8) + ifd + struct.pack('>I', 0)


def test_load_rgb_keeps_an_image_as_stored_when_its_exif_cannot_turn_it(tmp_path, capsys):
    path = tmp_path / 'odd_camera.jpg'
    Image.fromarray(random_frame(6, 30, 50)).save(path, quality=95,
                                                  exif=exif_with_a_mistyped_tag())
    rgb = load_rgb(str(path))
    with Image.open(path) as image:
        assert np.array_equal(rgb, np.asarray(image.convert('RGB')))
    assert rgb.shape == (30, 50, 3)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and 'EXIF orientation' in err and 'as stored' in err


def test_load_rgb_scales_16_bit_grey_to_8_bit(tmp_path):
    grey = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    path = tmp_path / 'depth_like.png'
    assert cv2.imwrite(str(path), grey)
    rgb = load_rgb(str(path))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    expected = np.rint(grey / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)


def test_a_truncated_jpeg_gets_one_line_that_it_cannot_be_decoded(image_folder, capsys):
    # Decoding it once for its EXIF orientation and once more for its pixels gave two lines,
    # the first a false one about EXIF.
    root, _ = image_folder
    path = str(root / 'shift_b/broken.jpg')
    with pytest.raises(ImageLoadError) as error:
        load_rgb(path)
    assert str(error.value).startswith(f'{path}: cannot be decoded (image file is truncated')
    assert capsys.readouterr().err == ''


def _alpha_pattern(height, width):
    """Return RGBA with fully transparent, half and fully opaque pixels over random colours."""
    rgba = np.concatenate([random_frame(11, height, width),
                           np.zeros((height, width, 1), np.uint8)], axis=2)
    rgba[:, width // 3:2 * width // 3, 3] = 128
    rgba[:, 2 * width // 3:, 3] = 255
    return rgba


def _palette_with_transparency():
    image = Image.fromarray(random_frame(12, 20, 30)).quantize(16)
    image.info['transparency'] = 3  # palette index 3 is see-through
    return image


@pytest.mark.parametrize('make, extension', [
    (lambda: Image.fromarray(_alpha_pattern(20, 30), 'RGBA'), '.png'),
    (lambda: Image.fromarray(_alpha_pattern(20, 30), 'RGBA').convert('LA'), '.png'),
    (_palette_with_transparency, '.png'),
    (lambda: Image.fromarray(random_frame(13, 20, 30)).quantize(16), '.png'),
    (lambda: Image.fromarray(random_frame(14, 20, 30)).convert('CMYK'), '.jpg'),
    (lambda: Image.fromarray(random_frame(15, 20, 30)).convert('CMYK'), '.tiff'),
])
def test_images_are_converted_to_rgb_as_the_checkpoints_processor_converts_them(
        tmp_path, make, extension):
    path = tmp_path / f'image{extension}'
    make().save(path)
    with Image.open(path) as image:
        expected = convert_to_rgb(image, return_numpy=True)
    assert np.array_equal(load_rgb(str(path)), expected)


def test_transparent_pixels_are_white_as_the_processor_shows_them(tmp_path):
    # Not the colour stored under them (random here, often black): white, as transformers'
    # convert_to_rgb composites, so the model sees what it sees in training and evaluation.
    rgba = _alpha_pattern(20, 30)
    path = tmp_path / 'cutout.png'
    Image.fromarray(rgba, 'RGBA').save(path)
    rgb = load_rgb(str(path))
    assert (rgb[:, :10] == 255).all()
    assert np.array_equal(rgb[:, 20:], rgba[:, 20:, :3])


def _png_header_only(width, height):
    """Return a grey PNG that announces any size and whose pixel data stops after 2 rows."""
    def chunk(kind, body):
        return (struct.pack('>I', len(body)) + kind + body
                + struct.pack('>I', zlib.crc32(kind + body)))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(bytes(2 * (width + 1)))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', rows)


@pytest.mark.parametrize('width, height, expected', [
    # 144 megapixels: above --max-pixels, and above Pillow's warning limit of 89 million.
    (12000, 12000, '12000x12000 = 144000000 pixels, above the limit of 8294400 (--max-pixels)'),
    # Above the limit Pillow refuses at, whatever --max-pixels says.
    (15000, 15000, 'too large to decode safely'),
])
def test_an_image_above_max_pixels_is_refused_from_its_header_in_one_line(
        tmp_path, width, height, expected):
    # Only the header is whole: decoding would fail with 'cannot be decoded' instead.
    path = tmp_path / 'huge.png'
    path.write_bytes(_png_header_only(width, height))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(ImageLoadError) as error:
            load_rgb(str(path), max_pixels=3840 * 2160)
    assert str(error.value).startswith(f'{path}: ')
    assert expected in str(error.value)
    # Python prints a warning in two lines, the second the source line that raised it.
    assert [warning.category.__name__ for warning in caught] == []


def test_max_pixels_option_skips_images_above_it(tmp_path, talkative_opt_checkpoint, capsys):
    small, large = tmp_path / 'a_small.png', tmp_path / 'b_large.png'
    Image.fromarray(random_frame(16, 16, 16)).save(small)
    Image.fromarray(random_frame(17, 16, 20)).save(large)
    status = main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3',
                   '--max-pixels', '256', str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == [str(small)]
    assert f'{large}: 20x16 = 320 pixels, above the limit of 256 (--max-pixels), skipped' in err
    assert main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3',
                 '--max-pixels', '320', str(tmp_path)]) == 0
    assert len(json_lines(capsys.readouterr().out)) == 2


def test_an_unreadable_folder_gets_one_line_and_the_rest_is_captioned(
        image_folder, talkative_opt_checkpoint, monkeypatch, capsys):
    root, _ = image_folder
    locked = str(root / 'shift_b')
    scandir = os.scandir

    def scandir_without_permission(path='.'):
        # What a folder without read permission gives anyone but root, who runs these tests.
        if os.fspath(path) == locked:
            raise PermissionError(13, 'Permission denied', locked)
        return scandir(path)

    monkeypatch.setattr(os, 'scandir', scandir_without_permission)
    images, problems = find_images([str(root)])
    assert problems == [f'{locked}: cannot read folder (Permission denied)']
    assert not any(path.startswith(locked) for path in images) and len(images) == 5
    status = main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3',
                   '--batch-size', '5', str(root)])
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == images
    assert f'{locked}: cannot read folder (Permission denied), skipped' in err
    assert 'captioned 5 images, skipped 0, 1 paths missing or unreadable' in err


@pytest.mark.parametrize('content', [b'', b'not an image', b'\x89PNG\r\n\x1a\n' + b'\0' * 40])
def test_load_rgb_reports_unreadable_files_in_one_line(tmp_path, content):
    path = tmp_path / 'bad.png'
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as error:
        load_rgb(str(path))
    assert str(path) in str(error.value) and '\n' not in str(error.value)


def test_find_images_follows_symlinked_folders_but_not_link_loops(tmp_path):
    root, elsewhere = tmp_path / 'root', tmp_path / 'elsewhere'
    root.mkdir()
    elsewhere.mkdir()
    Image.fromarray(random_frame(7, 8, 8)).save(root / 'belt.png')
    Image.fromarray(random_frame(8, 8, 8)).save(elsewhere / 'arm.png')
    (root / 'camera2').symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / 'back').symlink_to(root, target_is_directory=True)  # a loop
    images, problems = find_images([str(root)])
    assert [os.path.relpath(path, root) for path in images] == ['belt.png', 'camera2/arm.png']
    assert problems == []


def test_captions_every_readable_image_like_the_captioner(image_folder, talkative_opt_checkpoint,
                                                          capsys):
    root, _ = image_folder
    status = main(['--model', str(talkative_opt_checkpoint), '--batch-size', '2',
                   '--max-new-tokens', '6', '--device', 'cpu', str(root)])
    out, err = capsys.readouterr()

    assert status == 3  # captioned some, but broken.jpg failed
    lines = json_lines(out)
    expected_paths = [path for path in find_images([str(root)])[0]
                      if not path.endswith('broken.jpg')]
    assert [line['image'] for line in lines] == expected_paths
    captioner = Blip2Captioner(CaptionerConfig(model=str(talkative_opt_checkpoint), device='cpu',
                                               max_new_tokens=6))
    # Frames decoded independently: PNGs by OpenCV, JPEGs by PIL.
    frames = []
    for path in expected_paths:
        if path.lower().endswith('.png'):
            frames.append(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB))
        else:
            frames.append(np.asarray(Image.open(path).convert('RGB')))
    assert [line['caption'] for line in lines] == captioner.caption(frames)
    assert len({line['caption'] for line in lines}) > 1
    broken_lines = [line for line in err.splitlines() if 'broken.jpg' in line]
    assert len(broken_lines) == 1 and 'skipped' in broken_lines[0], err
    assert 'captioned 6 images, skipped 1' in err


def test_prompt_reaches_the_captioner(image_folder, talkative_opt_checkpoint, capsys):
    root, frames = image_folder
    prompt = 'Question: is the conveyor empty? Answer:'
    image = str(root / 'belt.png')
    assert main(['--model', str(talkative_opt_checkpoint), '--prompt', prompt,
                 '--max-new-tokens', '6', image]) == 0
    with_prompt = json_lines(capsys.readouterr().out)
    assert main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '6', image]) == 0
    without_prompt = json_lines(capsys.readouterr().out)
    captioner = Blip2Captioner(CaptionerConfig(model=str(talkative_opt_checkpoint),
                                               max_new_tokens=6))
    assert with_prompt == [{'image': image, 'caption': captioner.caption(
        [frames['belt.png']], prompt=prompt)[0]}]
    assert with_prompt != without_prompt


def test_the_training_prompt_is_the_default_and_a_given_prompt_wins(
        image_folder, talkative_opt_checkpoint, tmp_path, capsys):
    root, frames = image_folder
    trained = 'Question: is the conveyor empty? Answer:'
    model = tmp_path / 'trained'
    shutil.copytree(talkative_opt_checkpoint, model)
    (model / 'blip2_ros_training.json').write_text(json.dumps({'prompt': trained}))
    image = str(root / 'belt.png')
    captioner = Blip2Captioner(CaptionerConfig(model=str(model), max_new_tokens=6))
    assert main(['--model', str(model), '--max-new-tokens', '6', image]) == 0
    out, err = capsys.readouterr()
    assert json_lines(out)[0]['caption'] == captioner.caption(
        [frames['belt.png']], prompt=trained)[0]
    assert repr(trained) in err
    assert main(['--model', str(model), '--prompt', '', '--max-new-tokens', '6', image]) == 0
    assert json_lines(capsys.readouterr().out)[0]['caption'] == captioner.caption(
        [frames['belt.png']], prompt='')[0]
    assert captioner.caption([frames['belt.png']], prompt='') != captioner.caption(
        [frames['belt.png']], prompt=trained)

    (model / 'blip2_ros_training.json').write_text('{"prompt": ')
    assert main(['--model', str(model), image]) == 2
    err = capsys.readouterr().err
    assert 'blip2_ros_training.json' in err and len(err.strip().splitlines()) == 1


def test_an_image_too_big_for_memory_is_skipped_and_the_others_captioned(
        image_folder, talkative_opt_checkpoint, monkeypatch, capsys):
    root, _ = image_folder
    belt, huge, arm = (str(root / name)
                       for name in ('belt.png', 'shift_a/z_last.png', 'shift_b/arm.png'))
    open_image = Image.open

    def open_short_of_memory(path, *args, **kwargs):
        if str(path) == huge:
            raise MemoryError  # what PIL raises when the pixels do not fit
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, 'open', open_short_of_memory)
    status = main(['--model', str(talkative_opt_checkpoint), '--batch-size', '1',
                   '--max-new-tokens', '3', belt, huge, arm])
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == [belt, arm]
    assert f'{huge}: cannot read image (MemoryError), skipped' in err
    assert 'captioned 2 images, skipped 1' in err and 'Traceback' not in err


@pytest.mark.parametrize('failure', ['allocator', 'MemoryError'])
def test_out_of_memory_on_a_cpu_skips_the_batch_and_says_to_lower_batch_size(
        image_folder, talkative_opt_checkpoint, monkeypatch, capsys, failure):
    root, _ = image_folder
    paths = [str(root / name) for name in ('belt.png', 'shift_b/arm.png', 'shift_a/z_last.png')]
    caption = Blip2Captioner.caption

    def caption_short_of_memory(captioner, frames, *args, **kwargs):
        if len(frames) > 1:
            if failure == 'allocator':
                # A real failed allocation: torch's CPU allocator raises a plain RuntimeError.
                torch.empty(1 << 62, dtype=torch.uint8)
            raise MemoryError
        return caption(captioner, frames, *args, **kwargs)

    monkeypatch.setattr(Blip2Captioner, 'caption', caption_short_of_memory)
    status = main(['--model', str(talkative_opt_checkpoint), '--batch-size', '2',
                   '--max-new-tokens', '3'] + paths)
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == paths[2:]
    assert 'out of memory on a batch of 2 images, skipped them; lower --batch-size' in err
    assert 'captioned 1 images, skipped 2' in err


def test_a_file_name_that_is_not_utf8_is_printed_with_escapes(
        tmp_path, talkative_opt_checkpoint, capsys):
    # capsys encodes strictly as UTF-8, as a pipe does under PYTHONIOENCODING=utf-8:strict.
    path = os.path.join(str(tmp_path), os.fsdecode(b'caf\xe9.png'))
    Image.fromarray(random_frame(9, 16, 16)).save(path, format='PNG')
    status = main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3',
                   str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert [line['image'] for line in json_lines(out)] == [f'{tmp_path}/caf\\xe9.png']


def test_nothing_readable_exits_1(tmp_path, talkative_opt_checkpoint, capsys):
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n')
    (tmp_path / 'empty').mkdir()
    assert main(['--model', str(talkative_opt_checkpoint), str(tmp_path / 'broken.png')]) == 1
    out, err = capsys.readouterr()
    assert out == '' and 'broken.png' in err and 'captioned 0 images' in err
    assert main(['--model', str(talkative_opt_checkpoint), str(tmp_path / 'empty')]) == 1
    assert 'no image files found' in capsys.readouterr().err


def test_missing_path_is_skipped_with_a_warning(image_folder, talkative_opt_checkpoint, capsys):
    root, _ = image_folder
    status = main(['--model', str(talkative_opt_checkpoint), str(root / 'belt.png'),
                   str(root / 'missing.png')])
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == [str(root / 'belt.png')]
    assert f'{root / "missing.png"}: no such file or folder, skipped' in err


def test_model_that_cannot_load_exits_2_with_one_line(image_folder, tmp_path, capsys):
    root, _ = image_folder
    missing_model = tmp_path / 'no-model-here'
    status = main(['--model', str(missing_model), '--local-files-only', str(root)])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ''
    error_lines = [line for line in err.splitlines() if 'error' in line]
    assert len(error_lines) == 1 and str(missing_model) in error_lines[0]
    assert 'Traceback' not in err


def test_a_checkpoint_with_code_of_its_own_needs_trust_remote_code(
        image_folder, talkative_opt_checkpoint, code_of_its_own, capsys):
    root, _ = image_folder
    image = str(root / 'belt.png')
    checkpoint = str(code_of_its_own(talkative_opt_checkpoint))
    assert main(['--model', checkpoint, '--max-new-tokens', '6', image]) == 2
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if 'error' in line]
    assert out == '' and len(error_lines) == 1
    assert checkpoint in error_lines[0] and '--trust-remote-code' in error_lines[0]
    assert main(['--model', checkpoint, '--max-new-tokens', '6', '--trust-remote-code',
                 image]) == 0
    trusted = json_lines(capsys.readouterr().out)
    assert main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '6', image]) == 0
    assert trusted == json_lines(capsys.readouterr().out) and trusted[0]['caption']


def test_a_prompt_with_the_image_token_exits_2_with_one_line(image_folder, tmp_path, capsys):
    # The processor inserts the image's tokens; one more in the prompt would fail every batch.
    # The model folder is empty: the prompt is checked before anything loads.
    root, _ = image_folder
    status = main(['--model', str(tmp_path), '--prompt', 'what is in <image>?', str(root)])
    out, err = capsys.readouterr()
    assert status == 2 and out == ''
    assert len(err.strip().splitlines()) == 1 and '<image>' in err, err
    # The same prompt saved as the training prompt: the error names the file.
    (tmp_path / 'blip2_ros_training.json').write_text(json.dumps({'prompt': 'in <image>?'}))
    assert main(['--model', str(tmp_path), str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and '<image>' in err, err
    assert 'blip2_ros_training.json' in err, err


@pytest.mark.parametrize('arguments', [['--batch-size', '0'], ['--dtype', 'float8']])
def test_bad_arguments_exit_2(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments + ['--model', 'unused', 'unused.png'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip()


def start_caption_images(checkpoint, *arguments):
    """Start ``python -m blip2_ros.caption_images`` with ``checkpoint`` and 3 new tokens."""
    return subprocess.Popen(
        [sys.executable, '-m', 'blip2_ros.caption_images', '--model', str(checkpoint),
         '--max-new-tokens', '3', *map(str, arguments)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_runs_as_a_module(image_folder, talkative_opt_checkpoint):
    root, _ = image_folder
    process = start_caption_images(talkative_opt_checkpoint, root / 'belt.png',
                                   root / 'webcam.jpg')
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert [line['image'] for line in json_lines(stdout)] == [
        str(root / 'belt.png'), str(root / 'webcam.jpg')]


def test_folders_that_link_back_to_themselves_twice_are_walked_once(
        tmp_path, talkative_opt_checkpoint):
    # Two links back to the top make every level twice as many paths as the last: without the
    # guard the walk goes on until the kernel's 40-link limit, 2**40 folders later.
    root = tmp_path / 'camera'
    root.mkdir()
    Image.fromarray(random_frame(10, 16, 16)).save(root / 'belt.png')
    (root / 'left').symlink_to(root, target_is_directory=True)
    (root / 'right').symlink_to(root, target_is_directory=True)
    process = start_caption_images(talkative_opt_checkpoint, root)
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail('caption_images still walking a folder that links back to itself')
    assert process.returncode == 0, stderr
    assert [line['image'] for line in json_lines(stdout)] == [str(root / 'belt.png')]


def test_the_default_batch_size_captions_every_image_of_a_full_batch(
        image_folder, talkative_opt_checkpoint, capsys):
    root, frames = image_folder
    names = ['belt.png', 'shift_a/z_last.png', 'shift_b/arm.png', 'webcam_raw.png']
    paths = [str(root / name) for name in names]
    assert main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '6'] + paths) == 0
    out, err = capsys.readouterr()
    captioner = Blip2Captioner(CaptionerConfig(model=str(talkative_opt_checkpoint),
                                               max_new_tokens=6))
    assert json_lines(out) == [
        {'image': path, 'caption': caption}
        for path, caption in zip(paths, captioner.caption([frames[name] for name in names]))]
    assert 'captioned 4 images, skipped 0' in err


def test_an_error_that_is_not_out_of_memory_fails_its_batch_in_one_line_and_goes_on(
        image_folder, talkative_opt_checkpoint, monkeypatch, capsys):
    root, _ = image_folder
    paths = [str(root / name) for name in ('belt.png', 'shift_b/arm.png', 'shift_a/z_last.png')]
    caption = Blip2Captioner.caption

    def caption_with_a_bug(captioner, frames, *args, **kwargs):
        if frames[0].shape[0] == 120:  # arm.png
            torch.ones(2) @ torch.ones(3)  # a real torch RuntimeError: shapes that do not match
        return caption(captioner, frames, *args, **kwargs)

    monkeypatch.setattr(Blip2Captioner, 'caption', caption_with_a_bug)
    status = main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3',
                   '--batch-size', '1'] + paths)
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == [paths[0], paths[2]]
    lines = [line for line in err.splitlines() if line.startswith('caption_images:')]
    assert len(lines) == 2, err
    assert lines[0].startswith(f'caption_images: {paths[1]}: no captions (RuntimeError: ')
    assert 'size' in lines[0] and lines[0].endswith('skipped')
    assert 'captioned 2 images, skipped 1' in lines[1]
    assert 'out of memory' not in err and 'Traceback' not in err


def test_a_server_failure_for_one_image_fails_that_image_and_the_rest_are_captioned(
        image_folder, talkative_opt_checkpoint, monkeypatch, capsys):
    # --backend openai hands back CaptionFailure in place of a caption that did not come.
    from blip2_ros.server_captioner import CaptionFailure
    root, _ = image_folder
    paths = [str(root / name) for name in ('belt.png', 'shift_b/arm.png')]
    caption = Blip2Captioner.caption

    def caption_one_timed_out(captioner, frames, *args, **kwargs):
        captions = caption(captioner, frames, *args, **kwargs)
        return [CaptionFailure('server_timeout', 'no answer within 60 s')] + captions[1:]

    monkeypatch.setattr(Blip2Captioner, 'caption', caption_one_timed_out)
    status = main(['--model', str(talkative_opt_checkpoint), '--max-new-tokens', '3'] + paths)
    out, err = capsys.readouterr()
    assert status == 3
    assert [line['image'] for line in json_lines(out)] == paths[1:]
    assert f'{paths[0]}: no caption (no answer within 60 s), skipped' in err


@pytest.fixture
def many_images(tmp_path):
    """Write 200 small PNGs, more than either test below lets the command caption."""
    for index in range(200):
        assert cv2.imwrite(str(tmp_path / f'{index:03d}.png'), random_frame(index, 16, 16))
    return tmp_path


def test_ctrl_c_stops_with_130_and_complete_lines(many_images, talkative_opt_checkpoint):
    process = start_caption_images(talkative_opt_checkpoint, '--batch-size', '1', many_images)
    try:
        first = process.stdout.readline()
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'caption_images: interrupted' in stderr, stderr
    lines = json_lines(first + rest)
    assert 1 <= len(lines) < 200
    assert lines[0]['image'] == str(many_images / '000.png')


def test_a_reader_that_stops_early_ends_it_quietly(many_images, talkative_opt_checkpoint):
    # caption_images photos/ | head -1
    process = start_caption_images(talkative_opt_checkpoint, '--batch-size', '1', many_images)
    try:
        assert json.loads(process.stdout.readline())['image'] == str(many_images / '000.png')
        process.stdout.close()
        stderr = process.stderr.read()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 141, stderr
    assert 'Traceback' not in stderr and 'Broken pipe' not in stderr, stderr
