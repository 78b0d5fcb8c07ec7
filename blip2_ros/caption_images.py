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
order (folders are searched recursively, paths sorted). Unreadable images are reported on
stderr and skipped. Exit status: 0 when at least one image was captioned, 1 when none could be,
2 when the model cannot be loaded, 130 on Ctrl-C; a reader that stops early (``| head``) ends
it quietly.

    python -m blip2_ros.caption_images --model Salesforce/blip2-opt-2.7b photos/ extra.jpg
    python -m blip2_ros.caption_images --backend openai --server-url http://127.0.0.1:8000/v1 \
        --model blip2-opt-2.7b photos/

With ``--backend openai`` the images are captioned by an OpenAI-compatible server (vLLM) and
``--model`` is the name it serves; the API key, if the server needs one, comes from the
environment variable ``--api-key-env`` names. Exit status 2 also when the server cannot be
used (not reachable, wrong model name or key), at the start or during the run.
"""

import argparse
import json
import os
import sys

from blip2_ros.checkpoint import one_line
import numpy as np

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')
EXIT_OK, EXIT_NOTHING_CAPTIONED, EXIT_MODEL_ERROR = 0, 1, 2
# As a shell reports a program stopped by SIGINT or SIGPIPE.
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141


class ImageLoadError(Exception):
    """An image file that cannot be read or decoded; the message is one line."""


def find_images(paths):
    """
    Expand files and folders into a sorted, duplicate-free list of image paths.

    A file named on the command line is taken whatever its extension; folders are searched
    recursively for the extensions in IMAGE_EXTENSIONS (any case). Returns
    ``(images, missing)`` where ``missing`` lists the paths that do not exist.
    """
    images, missing, seen = [], [], set()
    for path in paths:
        if os.path.isdir(path):
            found, walked = [], set()
            # Symlinked subfolders are followed; a link back to a folder already walked (a
            # loop, or a second way to the same images) is not walked again.
            for folder, subfolders, files in os.walk(path, followlinks=True):
                real_folder = os.path.realpath(folder)
                if real_folder in walked:
                    subfolders.clear()
                    continue
                walked.add(real_folder)
                subfolders.sort()
                found.extend(os.path.join(folder, name) for name in files
                             if name.lower().endswith(IMAGE_EXTENSIONS))
            found.sort()
        elif os.path.isfile(path):
            found = [path]
        else:
            missing.append(path)
            continue
        for image in found:
            key = os.path.realpath(image)
            if key not in seen:
                seen.add(key)
                images.append(image)
    return images, missing


def load_rgb(path):
    """
    Read an image file into an HxWx3 uint8 RGB array, turned upright by its EXIF tag.

    Whatever goes wrong with this one file (a decoder error, too little memory for its pixels)
    raises ImageLoadError, so that a caller can skip it and go on with the others. An image
    whose EXIF block is too damaged to turn it by comes back as stored, with a warning.
    """
    from PIL import Image
    try:
        with Image.open(path) as image:
            image = _upright(image, path)
            if image.mode in ('I', 'I;16', 'I;16B', 'I;16L'):
                # PIL's convert('RGB') clips 16-bit grey at 255, which whites out the image.
                grey = np.asarray(image, dtype=np.float32) / 257.0
                grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
            return np.array(image.convert('RGB'), dtype=np.uint8)
    except Exception as error:  # noqa: B902 - decoders and plugins fail in many ways
        raise ImageLoadError(f'{path}: cannot read image ({one_line(error)})') from error


def _upright(image, path):
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: B902 - EXIF parsing raises struct.error and others
        _warn(f'{_printable(path)}: its EXIF orientation cannot be read ({one_line(error)}), '
              'so it is captioned as stored')
        return image


def _printable(path):
    """Return ``path`` as text that encodes as UTF-8 even where the name is not valid UTF-8."""
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def parse_args(argv=None):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog='caption_images', description=__doc__.strip().splitlines()[0],
        epilog='Exit status: 0 captioned at least one image, 1 none, 2 model not loadable.')
    parser.add_argument('paths', nargs='+', metavar='PATH', help='image files or folders')
    parser.add_argument('--model', default='Salesforce/blip2-opt-2.7b',
                        help='hub id or local folder of a BLIP-2 checkpoint; with --backend '
                             'openai the name the server serves')
    parser.add_argument('--backend', default='local', choices=('local', 'openai'),
                        help='local: the model runs here; openai: an OpenAI-compatible server '
                             '(vLLM) at --server-url captions the images')
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
    parser.add_argument('--batch-size', type=_positive_int, default=8,
                        help='images per generate call')
    parser.add_argument('--max-new-tokens', type=_positive_int, default=30)
    parser.add_argument('--local-files-only', action='store_true',
                        help='never download: use a local folder or the local cache only')
    parser.add_argument('--allow-pickle', action='store_true',
                        help='also load pickle (.bin) weights; only for checkpoints you trust')
    return parser.parse_args(argv)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be 1 or more, not {value}')
    return value


def _warn(message):
    print(f'caption_images: {message}', file=sys.stderr, flush=True)


def _out_of_memory(error, torch):
    # On a CPU torch's allocator reports a failed allocation as a plain RuntimeError.
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
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
    from blip2_ros.captioner import (CaptionerConfig, make_captioner, ModelLoadError,
                                     training_prompt)
    import torch

    args = parse_args(argv)
    images, missing = find_images(args.paths)
    for path in missing:
        _warn(f'{path}: no such file or folder, skipped')
    if not images:
        _warn('no image files found in ' + ' '.join(args.paths))
        return EXIT_NOTHING_CAPTIONED
    try:
        prompt = args.prompt
        if prompt is None:
            prompt = training_prompt(args.adapter, args.model)
            if prompt:
                _warn(f'prompt {prompt!r}: the one the model was trained with')
        captioner = make_captioner(CaptionerConfig(
            model=args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
            local_files_only=args.local_files_only, allow_pickle=args.allow_pickle,
            max_new_tokens=args.max_new_tokens, prompt=prompt, backend=args.backend,
            server_url=args.server_url, api_key_env=args.api_key_env,
            request_timeout=args.request_timeout, server_image_size=args.server_image_size,
            max_in_flight=args.batch_size))
        problem = captioner.check() if args.backend == 'openai' else None
        if problem:
            raise ModelLoadError(problem)
    except ModelLoadError as error:
        _warn(f'error: {error}')
        return EXIT_MODEL_ERROR

    captioned = skipped = 0
    for start in range(0, len(images), args.batch_size):
        paths, frames = [], []
        for path in images[start:start + args.batch_size]:
            try:
                frames.append(load_rgb(path))
                paths.append(path)
            except ImageLoadError as error:
                _warn(f'{error}, skipped')
                skipped += 1
        if not frames:
            continue
        try:
            captions = captioner.caption(frames)
        except (MemoryError, RuntimeError) as error:
            if not _out_of_memory(error, torch):
                raise
            _warn(f'out of memory on a batch of {len(frames)} images, skipped them; '
                  'lower --batch-size')
            skipped += len(frames)
            continue
        stop = None
        for path, caption in zip(paths, captions):
            if isinstance(caption, Exception):
                # A server that cannot be used fails every later image too: stop at once.
                if getattr(caption, 'lasting', False):
                    stop = caption
                    break
                _warn(f'{_printable(path)}: no caption ({caption}), skipped')
                skipped += 1
                continue
            # One write per line: Ctrl-C between the text and its newline would cut it.
            sys.stdout.write(json.dumps({'image': _printable(path), 'caption': caption},
                                        ensure_ascii=False) + '\n')
            captioned += 1
        sys.stdout.flush()
        if stop is not None:
            _warn(f'error: {stop}; stopped after {captioned} captions')
            return EXIT_MODEL_ERROR
    _warn(f'captioned {captioned} images, skipped {skipped}'
          + (f', {len(missing)} paths not found' if missing else ''))
    return EXIT_OK if captioned else EXIT_NOTHING_CAPTIONED


if __name__ == '__main__':
    sys.exit(main())
