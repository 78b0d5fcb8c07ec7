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

"""package.xml and the Fast DDS profile are well-formed, and package.xml is valid format 3."""

import os

from ament_xmllint.main import main
from catkin_pkg.package import parse_package
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.linter
@pytest.mark.xmllint
def test_xmllint_fastdds_profile():
    assert main(argv=[os.path.join(ROOT, 'config', 'fastdds_large_frames.xml')]) == 0


@pytest.mark.linter
@pytest.mark.xmllint
def test_package_xml_is_valid_format_3():
    # ament_xmllint would validate package.xml against the format 3 XSD, which it downloads
    # from the ROS website; catkin_pkg (what colcon and rosdep use) checks the same rules offline.
    package = parse_package(os.path.join(ROOT, 'package.xml'))
    package.validate()
    assert package.package_format == 3
    assert package.name == 'blip2_ros'
    exec_depends = {dependency.name for dependency in package.exec_depends}
    assert {'rclpy', 'sensor_msgs', 'std_msgs', 'std_srvs', 'diagnostic_msgs'} <= exec_depends
    # caption.launch.py runs under `ros2 launch` (the launch tutorial's advice for launch files)
    assert {'launch', 'launch_ros', 'ros2launch'} <= exec_depends
    assert package.get_build_type() == 'ament_python'


@pytest.mark.linter
@pytest.mark.xmllint
def test_package_xml_leaves_the_machine_learning_packages_to_pip():
    # `rosdep install --from-paths src` stops at a key rosdistro does not define (there is no
    # python3-safetensors-pip or python3-peft-pip), and the -pip keys it does define would
    # `sudo pip install` a CUDA torch into the system Python. requirements-ml.txt carries them.
    package = parse_package(os.path.join(ROOT, 'package.xml'))
    keys = {dependency.name for dependency in
            package.exec_depends + package.build_depends + package.test_depends}
    assert sorted(key for key in keys if key.endswith('-pip')) == []
    with open(os.path.join(ROOT, 'requirements-ml.txt')) as stream:
        requirements = {line.split('==')[0].strip() for line in stream if line.strip()}
    assert {'torch', 'transformers', 'safetensors', 'peft'} <= requirements
