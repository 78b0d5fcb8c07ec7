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
The node and the image code on a robot's ROS 2 Jazzy, not only on the Kilted wheels of .venv.

On a robot the node runs with the distribution's rclpy, and with its numpy 1.x and OpenCV 4.x
(requirements-ml.txt leaves them alone). OpenCV changed behaviour on the way to 5: a bare
number in arithmetic touched only the first channel, and a cut-off JPEG decoded instead of
failing. So those tests run a second time, in .venv/jazzy (requirements-jazzy.txt).
"""

import os
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
JAZZY_PYTHON = Path(sys.prefix) / 'jazzy' / 'bin' / 'python'
TESTS = ['test/test_caption_node.py', 'test/test_lifecycle.py', 'test/test_node_parameters.py',
         'test/test_caption_node_process.py', 'test/test_image_conversion.py',
         'test/test_synthetic_factory.py', 'test/test_caption_images.py']
VERSIONS = """
from importlib.metadata import version
import cv2, numpy, rclpy
print(version('ros-jazzy-rclpy'), numpy.__version__, cv2.__version__)
"""


def pinned_versions():
    """Return {'numpy': '1.26.4', ...} from requirements-jazzy.txt."""
    lines = (ROOT / 'requirements-jazzy.txt').read_text(encoding='utf-8').splitlines()
    return dict(line.replace('[fastrtps]', '').split('==') for line in lines
                if line and not line.startswith('#'))


def jazzy_environment():
    """Return this process's environment without what the Kilted wheels' start-up added."""
    environment = dict(os.environ)
    # The wheels start Python again with their libraries on LD_LIBRARY_PATH and mark that as
    # done; Jazzy's wheels must do the same with theirs.
    environment.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    library_path = [folder for folder in environment.pop('LD_LIBRARY_PATH', '').split(os.pathsep)
                    if folder and not folder.startswith(sys.prefix)]
    if library_path:
        environment['LD_LIBRARY_PATH'] = os.pathsep.join(library_path)
    return environment


def test_node_and_image_code_pass_their_tests_on_jazzy_with_ubuntus_numpy_and_opencv():
    assert JAZZY_PYTHON.is_file(), (
        f'{JAZZY_PYTHON} is missing: run scripts/setup_env.sh (./run_tests.sh does) to make '
        'the Jazzy environment of requirements-jazzy.txt')
    environment = jazzy_environment()
    found = subprocess.run([str(JAZZY_PYTHON), '-c', VERSIONS], cwd=ROOT, env=environment,
                           capture_output=True, text=True, check=True).stdout.split()
    pinned = pinned_versions()
    # OpenCV's wheel adds a build number to the library's own version.
    assert found == [pinned['ros-jazzy-rclpy'], pinned['numpy'],
                     pinned['opencv-python-headless'].rsplit('.', 1)[0]]

    result = subprocess.run(
        [str(JAZZY_PYTHON), '-m', 'pytest', '-p', 'no:cacheprovider', '-q', *TESTS],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
