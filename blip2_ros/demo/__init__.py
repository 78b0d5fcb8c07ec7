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
The demo, and what the demo, the tests and the benchmarks share.

``python -m blip2_ros.demo`` runs the live demo (:mod:`blip2_ros.demo.run`): the synthetic
factory (:mod:`.synthetic_factory`), a camera node that films it (:mod:`.factory_camera`), and
the caption node, isolated on loopback DDS (:mod:`.isolation`). A robot needs none of it.
"""
