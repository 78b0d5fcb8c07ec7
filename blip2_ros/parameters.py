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

"""ROS parameters declared from one list: descriptions, ranges, read-only flags, README tables."""

from dataclasses import dataclass
import json

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: its default, what it means, and whether it can change at run time."""

    name: str
    default: object
    description: str
    read_only: bool = True
    integer_range: tuple = None
    float_range: tuple = None

    def descriptor(self):
        """Return the ParameterDescriptor that ``ros2 param describe`` shows."""
        descriptor = ParameterDescriptor(description=self.description, read_only=self.read_only)
        if self.integer_range:
            descriptor.integer_range = [IntegerRange(
                from_value=self.integer_range[0], to_value=self.integer_range[1], step=1)]
        if self.float_range:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=self.float_range[0], to_value=self.float_range[1], step=0.0)]
        return descriptor


def declare(node, specs):
    """Declare every parameter of ``specs`` on ``node`` in one block."""
    node.declare_parameters('', [(spec.name, spec.default, spec.descriptor()) for spec in specs])


def markdown_table(specs):
    """Return a Markdown table of ``specs`` for the README."""
    rows = ['| name | default | changes at run time | what it does |', '|---|---|---|---|']
    for spec in specs:
        default = spec.default if isinstance(spec.default, str) else json.dumps(spec.default)
        default = default or "''"
        runtime = 'no' if spec.read_only else 'yes'
        rows.append(f'| `{spec.name}` | `{default}` | {runtime} | {spec.description} |')
    return '\n'.join(rows)
