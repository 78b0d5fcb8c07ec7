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

from glob import glob

from setuptools import find_packages, setup

package_name = 'blip2_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'benchmarks']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml') + glob('config/*.xml')),
        ('share/' + package_name + '/models/factory-tiny', glob('models/factory-tiny/*')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='blip2_ros maintainers',
    maintainer_email='maintainers@blip2-ros.dev',
    description='BLIP-2 image captioning for ROS 2 camera topics, and its fine-tuning tools.',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'caption_node = blip2_ros.caption_node:main',
            'caption_images = blip2_ros.caption_images:main',
            'factory_camera = blip2_ros.demo.factory_camera:main',
            'doctor = blip2_ros.doctor:main',
            'demo = blip2_ros.demo.run:main',
            'bag_to_coco = training.bag_to_coco:main',
            'split = training.split:main',
            'validate = training.validate:main',
            'train = training.train:main',
            'evaluate = training.evaluate:main',
            'record_synthetic_bag = training.record_synthetic_bag:main',
        ],
    },
)
