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

"""The caption node as users start it: its own process, the package's parameter file."""

import array
import os
import signal
import subprocess
import sys
import threading
import time

from blip2_ros.demo.isolation import claim_domain_id
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import Image
from std_msgs.msg import String

pytestmark = pytest.mark.ros

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS_FILE = os.path.join(ROOT, 'config', 'caption_node.yaml')


def run_node(*ros_args, environment=None):
    """Start ``python -m blip2_ros.caption_node`` with the package parameter file."""
    return subprocess.Popen(
        [sys.executable, '-m', 'blip2_ros.caption_node', '--ros-args',
         '--params-file', PARAMS_FILE, *ros_args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def test_unloadable_model_stops_the_node_with_one_clear_line():
    process = run_node('-p', 'model:=/no/such/blip2-folder', '-p', 'local_files_only:=true')
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert 'Traceback' not in stderr
    fatal = [line for line in stderr.splitlines() if 'FATAL' in line]
    assert len(fatal) == 1, stderr
    assert "cannot load BLIP-2 model '/no/such/blip2-folder'" in fatal[0]


@pytest.mark.parametrize('setting, expected', [
    ("image_topics:=['']", "image_topics: '' is not a valid topic name"),
    ('max_rate_hz:=2', 'bad value for parameter max_rate_hz'),
])
def test_bad_setting_stops_the_node_with_one_clear_line(tiny_opt_checkpoint, setting, expected):
    # A slip in a parameter file or on the command line, not a bug: no traceback.
    process = run_node('-p', f'model:={tiny_opt_checkpoint}', '-p', setting)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert 'Traceback' not in stderr
    fatal = [line for line in stderr.splitlines() if 'FATAL' in line]
    assert len(fatal) == 1 and expected in fatal[0], stderr


def test_main_gives_sigterm_back_when_it_returns(tiny_opt_checkpoint):
    # rclpy handles SIGTERM while it runs; a program that calls main() and goes on must still
    # end on SIGTERM afterwards.
    script = ('import signal, sys\n'
              'from blip2_ros.caption_node import main\n'
              'code = main(sys.argv[1:])\n'
              'print(code, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n')
    result = subprocess.run(
        [sys.executable, '-c', script, '--ros-args', '--params-file', PARAMS_FILE,
         '-p', f'model:={tiny_opt_checkpoint}', '-p', "image_topics:=['']"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['1', 'True'], (result.stdout, result.stderr)


@pytest.mark.parametrize('wait_policy, stop_signal', [('PASSIVE', signal.SIGINT),
                                                      (None, signal.SIGTERM)])
def test_node_process_captions_a_frame_and_exits_cleanly_on_a_stop_signal(
        lively_opt_checkpoint, wait_policy, stop_signal):
    environment = {name: value for name, value in os.environ.items()
                   if name != 'OMP_WAIT_POLICY'}
    if wait_policy:
        environment['OMP_WAIT_POLICY'] = wait_policy
    process = run_node('-p', f'model:={lively_opt_checkpoint}',
                       '-p', 'image_topics:=[/process_cam/image_raw]', '-p', 'torch_threads:=2',
                       environment=environment)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('process_test_peer', context=context)
    captions = []
    node.create_subscription(String, '/blip2/caption', lambda m: captions.append(m.data), 10)
    publisher = node.create_publisher(Image, '/process_cam/image_raw', 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + 60
        while publisher.get_subscription_count() == 0 or node.count_publishers(
                '/blip2/caption') == 0:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, 'the node never subscribed'
            time.sleep(0.05)
        frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        message = Image(height=48, width=64, encoding='rgb8', step=64 * 3)
        message.data = array.array('B', frame.tobytes())
        while not captions:
            publisher.publish(message)
            assert time.monotonic() < deadline, 'no caption arrived'
            time.sleep(0.2)
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert 'Traceback' not in stderr
        assert "loaded '" in stderr
        assert 'Loading weights' not in stderr and '\r' not in stderr, 'a progress bar'
        # Spinning OpenMP threads starve other processes on a busy CPU; say how to stop them.
        assert ('OMP_WAIT_POLICY=PASSIVE' in stderr) == (wait_policy is None), stderr
    finally:
        if process.poll() is None:
            process.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.parametrize('stop_signal', [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_the_model_compiles_ends_the_node_at_once(
        lively_opt_checkpoint, tmp_path, stop_signal):
    # ros2 launch stops nodes with SIGINT, then SIGTERM; docker stop and systemd use SIGTERM.
    # Compiling takes minutes on a robot and cannot be cut short: the node must neither wait
    # for it nor crash. A fresh compile cache makes the compile take long here too.
    environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'compile_cache'))
    process = run_node('-p', f'model:={lively_opt_checkpoint}', '-p', 'torch_compile:=true',
                       environment=environment)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if 'compiling the decode step' in line:
                break
        assert lines and 'compiling the decode step' in lines[-1], ''.join(lines)
        process.send_signal(stop_signal)
        process.wait(timeout=60)
        stderr = ''.join(lines) + process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert 'compiled in' not in stderr, 'the node waited for the compile to end'
    assert 'Traceback' not in stderr and 'terminate called' not in stderr, stderr


def test_without_autostart_the_process_waits_unconfigured_and_a_shutdown_ends_it(
        lively_opt_checkpoint):
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    # A name and a DDS domain of its own: nothing an earlier test of this long run left in
    # the graph (nodes gone or going, participants) can answer for this node or hide it.
    name = f'blip2_caption_{os.getpid()}'
    domain_id = claim_domain_id()
    process = run_node('-p', f'model:={lively_opt_checkpoint}', '-p', 'autostart:=false',
                       '-r', f'__node:={name}',
                       environment=dict(os.environ, ROS_DOMAIN_ID=str(domain_id)))
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node('process_lifecycle_peer', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    # Both clients first: a client DDS has only just matched can lose its first answer, so
    # each connection is proven by a call that changes nothing, asked again until answered.
    clients = {GetState: node.create_client(GetState, f'/{name}/get_state'),
               ChangeState: node.create_client(ChangeState, f'/{name}/change_state')}

    def call(service_type, request, tries=1):
        client = clients[service_type]
        assert client.wait_for_service(timeout_sec=60), f'{client.srv_name} did not appear'
        for _ in range(tries):
            future = client.call_async(request)
            executor.spin_until_future_complete(future, timeout_sec=60 / tries)
            if future.done():
                return future.result()
            client.remove_pending_request(future)
        raise AssertionError(f'no answer from {client.srv_name}: {process.poll()=}')

    def transition(transition_id, tries=1):
        request = ChangeState.Request()
        request.transition.id = transition_id
        return call(ChangeState, request, tries).success
    try:
        state = call(GetState, GetState.Request(), tries=6).current_state
        assert state.label == 'unconfigured'
        # Activating an unconfigured node is refused and changes nothing.
        assert not transition(Transition.TRANSITION_ACTIVATE, tries=6)
        time.sleep(1.0)
        assert process.poll() is None, 'the node must wait for a lifecycle manager'
        assert call(GetState, GetState.Request()).current_state.label == 'unconfigured'
        assert transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert 'Traceback' not in stderr
        assert "loaded '" not in stderr, 'no model without configure'
    finally:
        if process.poll() is None:
            process.kill()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
