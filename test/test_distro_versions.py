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
The image code against the numpy and OpenCV a robot's ROS 2 install uses, not PyPI's.

On a robot the node runs with the distribution's numpy 1.x and OpenCV 4.x (requirements-ml.txt
leaves them alone), and OpenCV changed behaviour on the way to 5: a bare number in arithmetic
touched only the first channel, and a cut-off JPEG decoded instead of failing. So the tests of
the code that touches pixels run a second time, in a child process that finds the versions of
requirements-distro.txt first on its path.
"""

import os
from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]
DISTRO = Path(sys.prefix) / 'distro'
PIXEL_TESTS = ['test/test_image_conversion.py', 'test/test_synthetic_factory.py',
               'test/test_caption_images.py']


def distro_versions():
    """Return {'numpy': '1.26.4', 'opencv-python-headless': '4.6.0.66'} from the file."""
    lines = (ROOT / 'requirements-distro.txt').read_text(encoding='utf-8').splitlines()
    return dict(line.split('==') for line in lines if line and not line.startswith('#'))


def test_pixel_code_passes_its_tests_with_the_distributions_numpy_and_opencv():
    assert DISTRO.is_dir(), (
        f'{DISTRO} is missing: run scripts/setup_env.sh (./run_tests.sh does) to install '
        'requirements-distro.txt there')
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(DISTRO), str(ROOT)]))
    found = subprocess.run(
        [sys.executable, '-c', 'import cv2, numpy; print(numpy.__version__, cv2.__version__)'],
        env=environment, capture_output=True, text=True, check=True).stdout.split()
    wanted = distro_versions()
    # OpenCV's wheel adds a build number to the library's own version.
    assert found == [wanted['numpy'], wanted['opencv-python-headless'].rsplit('.', 1)[0]]

    result = subprocess.run(
        [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', *PIXEL_TESTS],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
