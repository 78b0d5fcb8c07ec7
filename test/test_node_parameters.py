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

"""The parameter file, the node's declarations and the launch file agree with each other."""

import ast
import os

from blip2_ros.caption_node import PARAMETERS
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parameter_file_holds_every_declared_parameter_with_its_default():
    with open(os.path.join(ROOT, 'config', 'caption_node.yaml')) as stream:
        values = yaml.safe_load(stream)['/**']['ros__parameters']
    assert values == {spec.name: spec.default for spec in PARAMETERS}


def test_every_parameter_has_a_description_and_runtime_ones_are_the_documented_four():
    assert all(len(spec.description) > 20 for spec in PARAMETERS)
    runtime = {spec.name for spec in PARAMETERS if not spec.read_only}
    assert runtime == {'prompt', 'max_rate_hz', 'max_new_tokens', 'adapter'}


def test_launch_file_starts_a_lifecycle_node_with_an_autostart_argument():
    with open(os.path.join(ROOT, 'launch', 'caption.launch.py')) as stream:
        tree = ast.parse(stream.read())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    started = [getattr(node.func, 'id', '') for node in calls
               if getattr(node.func, 'id', '') in ('Node', 'LifecycleNode')]
    assert started == ['LifecycleNode']
    (node,) = [node for node in calls if getattr(node.func, 'id', '') == 'LifecycleNode']
    keywords = {keyword.arg: keyword.value for keyword in node.keywords}
    assert keywords['name'].value == 'blip2_caption'
    declared = {node.args[0].value for node in calls
                if getattr(node.func, 'id', '') == 'DeclareLaunchArgument'}
    assert 'autostart' in declared
    assert {spec.name: spec.default for spec in PARAMETERS}['autostart'] is True


def test_launch_file_offers_model_topic_and_prompt_arguments():
    with open(os.path.join(ROOT, 'launch', 'caption.launch.py')) as stream:
        tree = ast.parse(stream.read())
    declared = {node.args[0].value for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
                'DeclareLaunchArgument'}
    assert {'model', 'image_topic', 'prompt', 'params_file'} <= declared


def test_launch_file_makes_openmp_threads_wait_passively():
    with open(os.path.join(ROOT, 'launch', 'caption.launch.py')) as stream:
        tree = ast.parse(stream.read())
    settings = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, 'id', '') == 'SetEnvironmentVariable']
    assert [node.args[0].value for node in settings] == ['OMP_WAIT_POLICY']
    # The user's own setting wins; PASSIVE otherwise.
    default = settings[0].args[1]
    assert ast.unparse(default) == "os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')"


def test_torch_threads_is_declared_with_its_range():
    spec = {spec.name: spec for spec in PARAMETERS}['torch_threads']
    assert spec.default == 0 and spec.read_only
    (integer_range,) = spec.descriptor().integer_range
    assert (integer_range.from_value, integer_range.to_value) == (0, 256)
