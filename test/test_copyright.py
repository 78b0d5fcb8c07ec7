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

"""Every source file carries the Apache-2.0 license header (what ament_copyright checks)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ['blip2_ros', 'training', 'launch', 'scripts', 'test', 'benchmarks']
HEADER = (
    '# Copyright 2026 The blip2_ros Authors\n#\n'
    '# Licensed under the Apache License, Version 2.0 (the "License");\n')


def _python_files():
    yield os.path.join(ROOT, 'setup.py')
    for source in SOURCES:
        for folder, _, files in os.walk(os.path.join(ROOT, source)):
            yield from (os.path.join(folder, name) for name in files if name.endswith('.py'))


@pytest.mark.copyright
@pytest.mark.linter
def test_copyright():
    files = list(_python_files())
    missing = []
    for path in files:
        with open(path, encoding='utf-8') as source:
            text = source.read(len(HEADER) + 200)
            # A script's interpreter line comes first, as ament_copyright allows.
            if text.startswith('#!'):
                text = text.partition('\n')[2]
            if not text.startswith(HEADER):
                missing.append(os.path.relpath(path, ROOT))
    assert len(files) > 5
    assert not missing, 'files without the license header: ' + ', '.join(missing)
