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
Check a COCO captions dataset folder, made by bag_to_coco or by hand, before training on it.

``python -m training.validate DIR`` lists every problem, one line each, naming the entry:
missing or unreadable images, sizes that are not integers or disagree with the file, duplicate
ids or file names, captions that are empty or point at no image, and file names that would
leave DIR/images (``..``, absolute paths, symlinks to elsewhere). Training calls
:func:`check_dataset`, which raises :class:`DatasetError` when anything is wrong.
"""

import argparse
import os
from pathlib import Path, PurePosixPath
import sys

from PIL import Image
from training.coco import DatasetError, IMAGES_DIR, read_annotations

__all__ = ['DatasetError', 'check_dataset', 'is_id', 'validate_dataset']


def is_id(value):
    """Tell whether ``value`` is a COCO id: an integer, and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _name_problem(file_name):
    """Return why ``file_name`` cannot be used as a path under images/, or ''."""
    if not isinstance(file_name, str) or not file_name.strip():
        return 'file_name is missing or empty'
    if '\\' in file_name:
        return f"file_name '{file_name}' uses '\\'; use '/' between folders"
    if '\x00' in file_name:
        return 'file_name contains a NUL character'
    path = PurePosixPath(file_name)
    if path.is_absolute() or (len(file_name) > 1 and file_name[1] == ':'):
        return f"file_name '{file_name}' is absolute; it must be relative to {IMAGES_DIR}/"
    if '..' in path.parts:
        return f"file_name '{file_name}' contains '..' and would leave {IMAGES_DIR}/"
    return ''


def _image_problem(path, entry):
    """Open the image fully; return what is wrong with it, or ''."""
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except Exception as error:  # noqa: B902 - any decoder failure means an unusable file
        return f'cannot be decoded ({type(error).__name__}: {" ".join(str(error).split())})'
    actual = {'width': width, 'height': height}
    # Sizes that are not whole pixel counts are reported by _size_problem, not compared here.
    if any(_is_size(entry.get(key)) and entry[key] != actual[key] for key in actual):
        said = [entry[key] if _is_size(entry.get(key)) else '?' for key in actual]
        return f'is {width}x{height} but the entry says {said[0]}x{said[1]}'
    return ''


def _is_size(value):
    return is_id(value) and value > 0


def _size_problem(entry):
    """Return why the entry's width or height is not a pixel count, or ''."""
    for key in ('width', 'height'):
        if key in entry and not _is_size(entry[key]):
            return (f'{key} must be a positive integer, not {entry[key]!r} '
                    f'({type(entry[key]).__name__})')
    return ''


def validate_dataset(folder, decode_images=True):
    """
    Return a list of problems with the dataset in ``folder``; an empty list means it is fine.

    With ``decode_images`` every image is decoded in full (slower, but catches truncated
    files); without it only existence and headers are checked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f'{folder} is not a folder']
    try:
        data = read_annotations(folder)
    except DatasetError as error:
        return [str(error)]
    problems = []
    images_dir = folder / IMAGES_DIR
    images_root = images_dir.resolve()
    image_ids = {}
    file_names = {}
    for index, entry in enumerate(data['images']):
        where = f'images[{index}]'
        if not isinstance(entry, dict):
            problems.append(f'{where}: is not a JSON object')
            continue
        image_id = entry.get('id')
        file_name = entry.get('file_name')
        where = f'images[{index}] (id {image_id!r}, {file_name!r})'
        if not is_id(image_id):
            problems.append(f'{where}: id must be an integer')
        elif image_id in image_ids:
            problems.append(f'{where}: duplicate id, also used by images[{image_ids[image_id]}]')
        else:
            image_ids[image_id] = index
        size_problem = _size_problem(entry)
        if size_problem:
            problems.append(f'{where}: {size_problem}')
        name_problem = _name_problem(file_name)
        if name_problem:
            problems.append(f'{where}: {name_problem}')
            continue
        if file_name in file_names:
            problems.append(
                f'{where}: duplicate file_name, also used by images[{file_names[file_name]}]')
            continue
        file_names[file_name] = index
        path = images_dir / file_name
        resolved = Path(os.path.realpath(path))
        if resolved != images_root and images_root not in resolved.parents:
            problems.append(f'{where}: resolves to {resolved}, outside {images_dir} '
                            '(a symlink out of the dataset)')
            continue
        if not path.is_file():
            problems.append(f'{where}: image file {path} does not exist')
            continue
        if not os.access(path, os.R_OK):
            problems.append(f'{where}: image file {path} is not readable')
            continue
        if decode_images:
            image_problem = _image_problem(path, entry)
            if image_problem:
                problems.append(f'{where}: image {image_problem}')
    annotation_ids = {}
    for index, note in enumerate(data['annotations']):
        where = f'annotations[{index}]'
        if not isinstance(note, dict):
            problems.append(f'{where}: is not a JSON object')
            continue
        note_id = note.get('id')
        where = f'annotations[{index}] (id {note_id!r})'
        if not is_id(note_id):
            problems.append(f'{where}: id must be an integer')
        elif note_id in annotation_ids:
            problems.append(
                f'{where}: duplicate id, also used by annotations[{annotation_ids[note_id]}]')
        else:
            annotation_ids[note_id] = index
        if not is_id(note.get('image_id')) or note.get('image_id') not in image_ids:
            problems.append(f"{where}: image_id {note.get('image_id')!r} is not an image's id")
        caption = note.get('caption')
        if caption is not None and not isinstance(caption, str):
            problems.append(f'{where}: caption must be a string (one caption per annotation), '
                            f'not {type(caption).__name__}')
        elif not isinstance(caption, str) or not caption.strip():
            problems.append(f'{where}: caption is empty')
    return problems


def check_dataset(folder, decode_images=True, require_captions=False):
    """Raise DatasetError naming the first problem (and how many there are), else return."""
    problems = validate_dataset(folder, decode_images=decode_images)
    if not problems and require_captions and not read_annotations(folder)['annotations']:
        problems = [f'{folder} has no captions to train on']
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        raise DatasetError(f'dataset {folder} is not usable: {problems[0]}{more}; '
                           f'run python -m training.validate {folder} to list every problem')


def main(argv=None):
    """Command line: list a dataset's problems; exit code 1 if there are any."""
    parser = argparse.ArgumentParser(
        prog='validate', description='Check a COCO captions dataset folder.')
    parser.add_argument('folder', metavar='DIR')
    parser.add_argument('--no-decode', action='store_true',
                        help='check that images exist and open, without decoding them')
    args = parser.parse_args(argv)
    problems = validate_dataset(args.folder, decode_images=not args.no_decode)
    for problem in problems:
        print(problem)
    if problems:
        print(f'{args.folder}: {len(problems)} problem(s)', file=sys.stderr)
        return 1
    data = read_annotations(args.folder)
    print(f"{args.folder}: ok ({len(data['images'])} images, "
          f"{len(data['annotations'])} captions)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
