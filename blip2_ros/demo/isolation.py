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
ROS isolation for the processes the demo, the tests and the benchmarks start.

Each run takes a DDS domain that no other run on this machine holds (a lock file per id), keeps
discovery on loopback, and starts its children so that they die with it. The caption node and
the folder captioner never import this: it is how this checkout runs things side by side.
"""

import ctypes
import ctypes.util
import fcntl
import os
import random
import signal
import sys
import tempfile

# The folder that holds the blip2_ros package: the source tree, or site-packages when installed.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FASTDDS_PROFILE = ('config', 'fastdds_large_frames.xml')
# Domain ids the demo and the test runs take for themselves, each held by one process at a time
# (below 101, where Linux's ephemeral ports begin to overlap DDS's).
DOMAIN_IDS = range(11, 101)
DOMAIN_LOCK_FOLDER = os.path.join(tempfile.gettempdir(), 'blip2_ros_domains')
_HELD_DOMAIN_LOCKS = []


def share_path(*parts):
    """Find a file of the package: installed share/ folder first, else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        candidate = os.path.join(get_package_share_directory('blip2_ros'), *parts)
        if os.path.exists(candidate):
            return candidate
    except (ImportError, LookupError, OSError, ValueError):
        pass
    return os.path.join(PACKAGE_PARENT, *parts)


def lock_domain_id(domain_id):
    """Return an open file that holds ``domain_id``'s lock, or None if a process holds it."""
    os.makedirs(DOMAIN_LOCK_FOLDER, exist_ok=True)
    lock = open(os.path.join(DOMAIN_LOCK_FOLDER, f'{domain_id}.lock'), 'a')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None
    return lock


def claim_domain_id():
    """
    Return a ROS domain id that no other demo or test run of this machine holds, and hold it.

    Each id has a lock file in the temporary folder; the first one this process can lock is
    held, by the open file, until the process exits. Without a usable temporary folder, an id
    drawn at random from the same range.
    """
    try:
        for domain_id in DOMAIN_IDS:
            lock = lock_domain_id(domain_id)
            if lock:
                _HELD_DOMAIN_LOCKS.append(lock)
                return domain_id
    except OSError:
        pass
    return random.Random(os.getpid()).choice(DOMAIN_IDS)


def isolate_ros(domain_id=None, large_frames_profile=True):
    """
    Keep this process's DDS, and its children's, on loopback in a domain of its own.

    Call before rclpy is imported. ``domain_id`` None keeps a ROS_DOMAIN_ID the user chose,
    else claims a free one (:func:`claim_domain_id`). ``large_frames_profile`` gives Fast DDS's
    shared memory a 64 MB segment, unless the user chose a profile: with its 512 KB default,
    raw frames of 640x480 and more go out as UDP fragments, and a best-effort subscription
    loses nearly all of them (the tests send small frames and keep the default). Children
    import blip2_ros from this checkout, and the model hub is not asked unless the user
    allowed it.
    """
    if domain_id is None:
        domain_id = os.environ.get('ROS_DOMAIN_ID') or claim_domain_id()
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    if large_frames_profile:
        os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', share_path(*FASTDDS_PROFILE))
    os.environ['PYTHONPATH'] = _with_package_parent(os.environ.get('PYTHONPATH', ''))


def _with_package_parent(pythonpath):
    paths = [path for path in pythonpath.split(os.pathsep) if path]
    return os.pathsep.join([PACKAGE_PARENT] + [path for path in paths if path != PACKAGE_PARENT])


def child_environment():
    """Return the environment for a child node: this one, unbuffered, OpenMP threads idle."""
    env = dict(os.environ)
    # Children import blip2_ros from where this module came from, whatever their cwd.
    env['PYTHONPATH'] = _with_package_parent(env.get('PYTHONPATH', ''))
    env.setdefault('PYTHONUNBUFFERED', '1')
    # Camera and captioner share the CPU; OpenMP threads that spin while they wait would
    # starve the camera and slow every caption several times over.
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    return env


def parent_death_signal():
    """Return a preexec_fn that makes a child get SIGTERM when we die, or None off Linux."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        # Resolved here, not after fork: the child runs only this one foreign call.
        prctl = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec():
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        # We may have died between fork and prctl; then no signal will ever come.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec
