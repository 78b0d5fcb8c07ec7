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

"""ament_flake8 over the project's Python code (ament's configuration: 99 columns, quotes...)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ['blip2_ros', 'training', 'launch', 'scripts', 'test', 'benchmarks', 'setup.py']


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    paths = [os.path.join(ROOT, path) for path in SOURCES]
    paths = [path for path in paths if os.path.exists(path)]
    # In a process of its own: flake8 forks workers, and a fork of a test run whose DDS and
    # OpenMP threads are running can crash.
    result = subprocess.run(
        [sys.executable, '-c',
         'import sys; from ament_flake8.main import main; sys.exit(main(sys.argv[1:]))', *paths],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
