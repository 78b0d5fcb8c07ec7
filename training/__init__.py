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

"""Workstation tools: rosbags to COCO caption datasets, fine-tuning and evaluation of BLIP-2."""

import logging

# Importing transformers' Trainer or loading a model imports torchao where it is installed: on a
# CPU-only torch it logs a warning for each CUDA extension it cannot load and one for missing
# Triton, and torch logs a deprecation notice for each enum torchao registers. None of that is
# anything a user of these tools can act on (blip2_ros.checkpoint silences the same lines).
for _name in ('torchao', 'torch.utils._pytree'):
    logging.getLogger(_name).setLevel(logging.ERROR)
