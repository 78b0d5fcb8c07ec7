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
Start the BLIP-2 caption node, a lifecycle node, with the package's parameter file.

    ros2 launch blip2_ros caption.launch.py model:=Salesforce/blip2-opt-2.7b \
        image_topic:=/camera/image_raw prompt:='a photo of'
    ros2 launch blip2_ros caption.launch.py backend:=openai \
        server_url:=http://gpu-server:8000/v1 model:=blip2-opt-2.7b
    ros2 launch blip2_ros caption.launch.py autostart:=false

With ``autostart:=true`` (the default) the node configures and activates itself; with false it
waits, unconfigured and without a model, for a lifecycle manager (or ``ros2 lifecycle set``).
Launch arguments left empty keep the value from config/caption_node.yaml; ``params_file`` swaps
that file for one of your own.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode


def _caption_node(context):
    # Launch arguments left empty keep the parameter file's value.
    overrides = {}
    for name in ('model', 'adapter', 'prompt', 'device', 'backend', 'server_url'):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    topics = LaunchConfiguration('image_topic').perform(context)
    if topics:
        # Several cameras: image_topic:='/left/image_raw,/right/image_raw/compressed'
        overrides['image_topics'] = [topic.strip() for topic in topics.split(',') if topic.strip()]
    autostart = LaunchConfiguration('autostart').perform(context)
    if autostart:
        overrides['autostart'] = autostart.lower() in ('true', '1', 'yes')
    return [LifecycleNode(
        package='blip2_ros', executable='caption_node', name='blip2_caption', namespace='',
        output='screen',
        parameters=[LaunchConfiguration('params_file').perform(context), overrides])]


def generate_launch_description():
    """Declare the launch arguments and the caption node."""
    default_params = os.path.join(
        get_package_share_directory('blip2_ros'), 'config', 'caption_node.yaml')
    return LaunchDescription([
        DeclareLaunchArgument('params_file', default_value=default_params,
                              description='Parameter file of the caption node.'),
        DeclareLaunchArgument('autostart', default_value='',
                              description='true: configure and activate at start; false: '
                              'wait unconfigured for a lifecycle manager. Empty keeps the '
                              'parameter file (true).'),
        DeclareLaunchArgument('model', default_value='',
                              description='Hub id or folder of a BLIP-2 checkpoint.'),
        DeclareLaunchArgument('adapter', default_value='',
                              description='LoRA adapter folder from the training package.'),
        DeclareLaunchArgument('image_topic', default_value='',
                              description='Camera topic(s), comma separated; ending in '
                              '/compressed means CompressedImage.'),
        DeclareLaunchArgument('prompt', default_value='',
                              description="Caption prompt, e.g. 'a photo of'."),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu, cuda or cuda:N.'),
        DeclareLaunchArgument('backend', default_value='',
                              description='local (model in the node) or openai (a vLLM '
                              'server at server_url).'),
        DeclareLaunchArgument('server_url', default_value='',
                              description='backend openai: base URL of the server, e.g. '
                              'http://127.0.0.1:8000/v1.'),
        # OpenMP threads that finish early sleep instead of spinning: on a robot whose cores
        # are shared, spinning torch threads starve the node's own executor threads and every
        # other process (unless the environment already says otherwise).
        SetEnvironmentVariable('OMP_WAIT_POLICY', os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')),
        OpaqueFunction(function=_caption_node),
    ])
