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
Caption image files and folders with BLIP-2, without ROS.

Prints one JSON object per image on stdout, ``{"image": path, "caption": text}``, in a fixed
order (folders are searched recursively, paths sorted). Images are converted to RGB as the
checkpoint's processor converts them (transparency on white). Every file that cannot be used
(unreadable, undecodable, above ``--max-pixels``), every missing path, every unreadable folder,
every batch whose captioning failed and every image whose scores turned NaN or inf in the model
gets one line on stderr naming it and why, and the others are captioned. With
``--adapter``, a line on stderr names the adapter, its base model and its training prompt.
Exit status: 0 when every image was captioned, 3 when some were and some failed, 1 when none
could be, 2 when the model cannot be loaded, 130 on Ctrl-C; a reader that stops early
(``| head``) ends it quietly.

    python -m blip2_ros.caption_images --model Salesforce/blip2-opt-2.7b photos/ extra.jpg
    python -m blip2_ros.caption_images --backend openai --server-url http://127.0.0.1:8000/v1 \
        --model blip2-opt-2.7b photos/
    python -m blip2_ros.caption_images --backend openvino --model Salesforce/blip2-opt-2.7b \
        photos/

With ``--backend openai`` the images are captioned by an OpenAI-compatible server (vLLM) and
``--model`` is the name it serves; the API key, if the server needs one, comes from the
environment variable ``--api-key-env`` names. Exit status 2 also when the server cannot be
used (not reachable, wrong model name or key), at the start or during the run.
"""

import argparse
import json
import os
import sys
import warnings

from blip2_ros.checkpoint import one_line
import numpy as np

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')
EXIT_OK, EXIT_NOTHING_CAPTIONED, EXIT_MODEL_ERROR, EXIT_SOME_FAILED = 0, 1, 2, 3
# As a shell reports a program stopped by SIGINT or SIGPIPE.
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
# The node's max_pixels default: 4K UHD.
DEFAULT_MAX_PIXELS = 3840 * 2160
# The modes Pillow opens 16-bit grey images in.
_SIXTEEN_BIT_GREY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


class ImageLoadError(Exception):
    """An image file that cannot be read or decoded; the message is one line."""


def find_images(paths):
    """
    Expand files and folders into a sorted, duplicate-free list of image paths.

    A file named on the command line is taken whatever its extension; folders are searched
    recursively for the extensions in IMAGE_EXTENSIONS (any case). Returns
    ``(images, problems)``: ``problems`` has one line per path that does not exist and per
    folder that cannot be read, naming it and why.
    """
    images, problems, seen = [], [], set()
    for path in paths:
        if os.path.isdir(path):
            found = _walk_folder(path, problems)
        elif os.path.isfile(path):
            found = [path]
        else:
            problems.append(f'{_printable(path)}: no such file or folder')
            continue
        for image in found:
            key = os.path.realpath(image)
            if key not in seen:
                seen.add(key)
                images.append(image)
    return images, problems


def _walk_folder(top, problems):
    """Return the sorted image paths under ``top``; add to problems each unreadable folder."""
    def unreadable(error):
        problems.append(f'{_printable(error.filename or top)}: cannot read folder '
                        f'({error.strerror or one_line(error)})')

    found, walked = [], set()
    # Symlinked subfolders are followed; a link back to a folder already walked (a loop, or a
    # second way to the same images) is not walked again.
    for folder, subfolders, files in os.walk(top, onerror=unreadable, followlinks=True):
        real_folder = os.path.realpath(folder)
        if real_folder in walked:
            subfolders.clear()
            continue
        walked.add(real_folder)
        subfolders.sort()
        found.extend(os.path.join(folder, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def load_rgb(path, max_pixels=None):
    """
    Read an image file into an HxWx3 uint8 RGB array, turned upright by its EXIF tag.

    Converted to RGB as the checkpoint's image processor converts (transformers'
    ``convert_to_rgb``): transparency composited on white, palette and CMYK converted, and
    16-bit grey scaled to 8 bit. An image of more than ``max_pixels`` pixels is refused from
    its header, before any pixel is decoded. Whatever goes wrong with this one file (a decoder
    error, too little memory for its pixels) raises ImageLoadError, so that a caller can skip
    it and go on with the others. An image whose EXIF block is too damaged to turn it by comes
    back as stored, with a warning.
    """
    from PIL import Image
    name = _printable(path)
    try:
        with warnings.catch_warnings():
            # A large header is answered by max_pixels in one line, not Pillow's two-line warning.
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f'{name}: too large to decode safely ({one_line(error)})') from error
    except Exception as error:  # noqa: B902 - decoders and plugins fail in many ways
        raise ImageLoadError(f'{name}: cannot read image ({one_line(error)})') from error
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageLoadError(
                f'{name}: {width}x{height} = {width * height} pixels, above the limit of '
                f'{max_pixels} (--max-pixels)')
        try:
            # Decoded first: a truncated file is a decoding error, not an EXIF one.
            image.load()
        except Exception as error:  # noqa: B902
            raise ImageLoadError(f'{name}: cannot be decoded ({one_line(error)})') from error
        try:
            return _to_rgb(_upright(image, name))
        except Exception as error:  # noqa: B902 - MemoryError, a plugin's odd mode
            raise ImageLoadError(f'{name}: cannot convert to RGB ({one_line(error)})') from error


def _to_rgb(image):
    """Convert a decoded PIL image as transformers' convert_to_rgb does, 16-bit grey aside."""
    from PIL import Image
    if image.mode in _SIXTEEN_BIT_GREY_MODES:
        # PIL's convert('RGB') clips 16-bit grey at 255, which whites out the image.
        grey = np.asarray(image, dtype=np.float32) / 257.0
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if 'A' in image.getbands() or image.info.get('transparency') is not None:
        # What lies under a transparent pixel is often black or noise; the processor shows the
        # model white there, and so does this.
        white = Image.new('RGBA', image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert('RGBA'))
    return np.array(image.convert('RGB'), dtype=np.uint8)


def _upright(image, name):
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: B902 - EXIF parsing raises struct.error and others
        _warn(f'{name}: its EXIF orientation cannot be read ({one_line(error)}), '
              'so it is captioned as stored')
        return image


def _printable(path):
    """Return ``path`` as text that encodes as UTF-8 even where the name is not valid UTF-8."""
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog='caption_images', description=__doc__.strip().splitlines()[0],
        epilog='Exit status: 0 captioned every image, 3 captioned some but some failed '
               '(unreadable or too large files, missing paths, unreadable folders, failed '
               'batches), 1 none captioned, 2 model or server not usable.')
    parser.add_argument('paths', nargs='+', metavar='PATH', help='image files or folders')
    parser.add_argument('--model', default='Salesforce/blip2-opt-2.7b',
                        help='hub id or local folder of a BLIP-2 checkpoint; with --backend '
                             'openai the name the server serves')
    parser.add_argument('--backend', default='local', choices=('local', 'openai', 'openvino'),
                        help='local: the model runs here; openai: an OpenAI-compatible server '
                             '(vLLM) at --server-url captions the images; openvino: the model '
                             'runs here on the CPU through OpenVINO (OPT checkpoints; '
                             'converted once and kept in ~/.cache/blip2_ros/openvino)')
    parser.add_argument('--openvino-weights', default='fp32', choices=('fp32', 'int8'),
                        help='--backend openvino: fp32 (captions as --backend local) or int8 '
                             '(8-bit weights: faster, captions may change a little)')
    parser.add_argument('--server-url', default='http://127.0.0.1:8000/v1',
                        help='--backend openai: base URL of the server')
    parser.add_argument('--api-key-env', default='',
                        help='--backend openai: environment variable that holds the API key')
    parser.add_argument('--request-timeout', type=float, default=60.0,
                        help='--backend openai: seconds one image may take (default 60)')
    parser.add_argument('--server-image-size', type=_positive_int, default=224,
                        help="--backend openai: the served model's image size (default 224)")
    parser.add_argument('--prompt', default=None,
                        help="text the caption continues, e.g. 'Question: what is on the "
                             "conveyor? Answer:' (default: the prompt the model or adapter "
                             'was trained with, if training.train made it, else none)')
    parser.add_argument('--adapter', default='', help='LoRA adapter folder to merge')
    parser.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='auto',
                        choices=('auto', 'float32', 'float16', 'bfloat16'))
    parser.add_argument('--quantization', default='none', choices=('none', 'int8', 'int4'),
                        help='weight-only 8-bit (torchao; CPU and GPU) or 4-bit (bitsandbytes '
                             'NF4; GPU only) weights: less memory, captions may change a little')
    parser.add_argument('--batch-size', type=_positive_int, default=8,
                        help='images per generate call')
    parser.add_argument('--max-new-tokens', type=_positive_int, default=30)
    parser.add_argument('--max-pixels', type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        help='images with more pixels than this are skipped, checked from '
                             f'the header before decoding (default {DEFAULT_MAX_PIXELS}, '
                             "3840x2160, the node's max_pixels)")
    parser.add_argument('--local-files-only', action='store_true',
                        help='never download: use a local folder or the local cache only')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='also load pickle (.bin) weights; only for checkpoints you trust')
    parser.add_argument('--trust-remote-code', '--trust_remote_code', action='store_true',
                        help="run the code a checkpoint's config.json names (auto_map); only "
                             'for checkpoints you trust')
    return parser.parse_args(argv)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be 1 or more, not {value}')
    return value


def _warn(message):
    print(f'caption_images: {message}', file=sys.stderr, flush=True)


def _out_of_memory(error):
    # torch.OutOfMemoryError (CUDA) by name, so that the openai backend needs no torch; on a
    # CPU torch's allocator reports a failed allocation as a plain RuntimeError.
    return (isinstance(error, MemoryError) or type(error).__name__ == 'OutOfMemoryError'
            or "can't allocate memory" in str(error))


def main(argv=None):
    """Caption the images under the given paths; return the exit status."""
    try:
        return _caption_paths(argv)
    except KeyboardInterrupt:
        _warn('interrupted; every caption printed so far is complete')
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader stopped reading (head, a closed pager). Python would still flush stdout
        # at exit and print a second error: point it at /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _caption_paths(argv):
    args = parse_args(argv)
    images, problems = find_images(args.paths)
    for problem in problems:
        _warn(f'{problem}, skipped')
    if not images:
        _warn('no image files found in ' + ' '.join(map(_printable, args.paths)))
        return EXIT_NOTHING_CAPTIONED
    captioner = _make_captioner(args)
    if captioner is None:
        return EXIT_MODEL_ERROR

    captioned = skipped = 0
    for start in range(0, len(images), args.batch_size):
        paths, frames = [], []
        for path in images[start:start + args.batch_size]:
            try:
                frames.append(load_rgb(path, args.max_pixels))
                paths.append(path)
            except ImageLoadError as error:
                _warn(f'{error}, skipped')
                skipped += 1
        if not frames:
            continue
        done, failed, stop = _caption_batch(captioner, paths, frames)
        captioned += done
        skipped += failed
        if stop is not None:
            _warn(f'error: {stop}; stopped after {captioned} captions')
            return EXIT_MODEL_ERROR
    _warn(f'captioned {captioned} images, skipped {skipped}'
          + (f', {len(problems)} paths missing or unreadable' if problems else ''))
    if not captioned:
        return EXIT_NOTHING_CAPTIONED
    return EXIT_SOME_FAILED if skipped or problems else EXIT_OK


def _make_captioner(args):
    """Return the captioner the arguments ask for, or None after one line saying why not."""
    from blip2_ros.captioner import (adapter_training_prompt, CaptionerConfig, make_captioner,
                                     ModelLoadError, training_prompt)
    try:
        prompt = args.prompt
        if prompt is None:
            prompt = training_prompt(args.adapter, args.model)
            if prompt:
                _warn(f'prompt {prompt!r}: the one the model was trained with')
        captioner = make_captioner(CaptionerConfig(
            model=args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
            local_files_only=args.local_files_only, allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
            max_new_tokens=args.max_new_tokens, prompt=prompt, backend=args.backend,
            quantization=args.quantization, openvino_weights=args.openvino_weights,
            server_url=args.server_url, api_key_env=args.api_key_env,
            request_timeout=args.request_timeout, server_image_size=args.server_image_size,
            max_in_flight=args.batch_size))
        problem = captioner.check() if args.backend == 'openai' else None
        if problem:
            raise ModelLoadError(problem)
    except ModelLoadError as error:
        _warn(f'error: {error}')
        return None
    except Exception as error:  # noqa: B902 - one line, whatever the libraries raise
        _warn(f'error: cannot load {args.model}: {type(error).__name__}: {one_line(error)}')
        return None
    if args.adapter:
        # Which weights wrote the captions below: the adapter, next to its base model.
        trained = adapter_training_prompt(args.adapter)
        _warn(f"captioning with adapter '{args.adapter}' on '{args.model}'"
              + ('' if trained is None else f' (trained with prompt {trained!r})'))
    return captioner


def _caption_batch(captioner, paths, frames):
    """
    Caption one batch and print a line per caption; return (captioned, failed, stop).

    ``stop`` is the failure of a server that cannot be used, which ends the run; any other
    failure costs this batch or one image and the run goes on.
    """
    from blip2_ros.captioner import caption_results

    try:
        # NaN or inf scores come back as failures naming what to try.
        captions = caption_results(captioner, frames)
    except Exception as error:  # noqa: B902 - one line per failed batch, never a traceback
        if _out_of_memory(error):
            _warn(f'out of memory on a batch of {len(frames)} images, skipped them; '
                  'lower --batch-size')
        else:
            named = _printable(paths[0]) + (f' and {len(paths) - 1} more' if len(paths) > 1
                                            else '')
            _warn(f'{named}: no captions ({type(error).__name__}: {one_line(error)}), skipped')
        return 0, len(frames), None
    captioned = failed = 0
    for path, caption in zip(paths, captions):
        if isinstance(caption, Exception):
            # A server that cannot be used fails every later image too: stop at once.
            if getattr(caption, 'lasting', False):
                sys.stdout.flush()
                return captioned, failed, caption
            _warn(f'{_printable(path)}: no caption ({caption}), skipped')
            failed += 1
            continue
        # One write per line: Ctrl-C between the text and its newline would cut it.
        sys.stdout.write(json.dumps({'image': _printable(path), 'caption': caption},
                                    ensure_ascii=False) + '\n')
        captioned += 1
    sys.stdout.flush()
    return captioned, failed, None


if __name__ == '__main__':
    sys.exit(main())
