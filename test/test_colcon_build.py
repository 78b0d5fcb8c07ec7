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

"""`colcon build` of the repository installs the executables, launch and parameter files."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colcon_build_installs_package(tmp_path):
    colcon = shutil.which('colcon', path=os.path.dirname(sys.executable))
    assert colcon, 'colcon is missing from the test environment: pip install -r requirements.txt'
    workspace = tmp_path / 'ws'
    (workspace / 'src').mkdir(parents=True)
    # A copy without the virtual environment, as a user's workspace would hold it.
    shutil.copytree(ROOT, workspace / 'src' / 'blip2_ros', ignore=shutil.ignore_patterns(
        '.venv', '.git', 'build', 'install', 'log', '__pycache__', '*.egg-info'))
    result = subprocess.run(
        [colcon, 'build', '--packages-select', 'blip2_ros'], cwd=workspace,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    share = workspace / 'install' / 'blip2_ros' / 'share' / 'blip2_ros'
    assert (share / 'launch' / 'caption.launch.py').is_file()
    assert (share / 'config' / 'caption_node.yaml').is_file()
    assert (share / 'config' / 'fastdds_large_frames.xml').is_file()
    assert (share / 'package.xml').is_file()
    executables = workspace / 'install' / 'blip2_ros' / 'lib' / 'blip2_ros'
    assert (executables / 'caption_node').is_file(), 'ros2 run blip2_ros caption_node needs it'
    assert (workspace / 'install' / 'share' / 'ament_index' / 'resource_index' / 'packages'
            / 'blip2_ros').is_file() or (
        workspace / 'install' / 'blip2_ros' / 'share' / 'ament_index' / 'resource_index'
        / 'packages' / 'blip2_ros').is_file()
