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

"""The caption node as a managed node: lifecycle transitions and adapter swaps over DDS."""

import json
import os
import shutil
import threading
import time

from blip2_ros import caption_node
from blip2_ros.captioner import Blip2Captioner, CaptionerConfig
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
import psutil
import pytest
from rcl_interfaces.msg import Parameter as ParameterMessage, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
import rclpy
from rclpy.parameter import Parameter
from ros_harness import Harness, image_message, make_frame, wait_for
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger
from vllm_server import build_lora_training_output

pytestmark = pytest.mark.ros

NODE = '/blip2_caption'


def mapped_files():
    """Return the files this process has memory-mapped."""
    with open('/proc/self/maps', encoding='utf-8') as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps
                if len(line.split(maxsplit=5)) == 6}


def change_state(harness, transition_id):
    """Ask the node for a transition over its change_state service; return success."""
    request = ChangeState.Request()
    request.transition.id = transition_id
    return harness.call(ChangeState, f'{NODE}/change_state', request).success


def get_state(harness):
    """Return the node's state label as its get_state service tells it."""
    return harness.call(GetState, f'{NODE}/get_state', GetState.Request()).current_state.label


def set_adapter(harness, adapter):
    """Set the adapter parameter as `ros2 param set` does; return (successful, reason)."""
    value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(adapter))
    request = SetParameters.Request(parameters=[ParameterMessage(name='adapter', value=value)])
    (result,) = harness.call(SetParameters, f'{NODE}/set_parameters', request).results
    return result.successful, result.reason


def last_status(harness):
    """Return the newest diagnostics status of the caption node."""
    wait_for(lambda: harness.diagnostics, what='diagnostics')
    return harness.diagnostics[-1].status[0]


def caption_one(harness, camera, frame, count):
    """Publish ``frame`` until the ``count``-th caption arrives; return that caption."""
    deadline = time.monotonic() + 20
    while len(harness.infos) < count:
        camera.publish(image_message(frame))
        assert time.monotonic() < deadline, 'no caption'
        time.sleep(0.2)
    return harness.infos[count - 1]['caption']


def make_adapter(checkpoint, folder, seed):
    """Save a LoRA adapter for ``checkpoint`` whose captions differ from the base model's."""
    return build_lora_training_output(checkpoint, folder, std=0.5, seed=seed)


def expected_caption(checkpoint, frame, adapter=''):
    """Caption ``frame`` in-process with the base model plus ``adapter``."""
    captioner = Blip2Captioner(CaptionerConfig(model=str(checkpoint), adapter=str(adapter),
                                               device='cpu', dtype='float32'))
    return captioner.caption([frame], max_new_tokens=6)[0]


@pytest.fixture
def slow_loading(monkeypatch):
    """Make loading the model take at least a second, so that tests can watch it load."""
    make_captioner = caption_node.make_captioner

    def slow(config):
        time.sleep(1.5)
        return make_captioner(config)
    monkeypatch.setattr(caption_node, 'make_captioner', slow)


def test_every_transition_over_the_lifecycle_services(harness_factory, lively_opt_checkpoint,
                                                      slow_loading, tmp_path):
    # A copy of its own: other tests' captioners of this session may still map the shared one.
    checkpoint = shutil.copytree(lively_opt_checkpoint, tmp_path / 'opt')
    weights = str(checkpoint / 'model.safetensors')
    harness = harness_factory(checkpoint, ['/cam'], autostart=False, max_new_tokens=6)
    node = harness.node
    # Unconfigured: no model, and the node says so.
    assert get_state(harness) == 'unconfigured'
    assert node.captioner is None and weights not in mapped_files()
    wait_for(lambda: last_status(harness).message.startswith('unconfigured'),
             what='diagnostics saying unconfigured')
    response = harness.call(Trigger, f'{NODE}/caption_now', Trigger.Request())
    assert not response.success and 'not active' in response.message

    # configure loads the model; the node answers services and diagnostics meanwhile.
    configured = []
    thread = threading.Thread(
        target=lambda: configured.append(change_state(harness, Transition.TRANSITION_CONFIGURE)))
    thread.start()
    wait_for(lambda: get_state(harness) == 'configuring', what='get_state saying configuring')
    wait_for(lambda: 'loading' in last_status(harness).message,
             what='diagnostics saying the model loads')
    thread.join(timeout=60)
    assert configured == [True] and get_state(harness) == 'inactive'
    assert node.captioner is not None and weights in mapped_files()

    # Inactive: the model is loaded and nothing is captioned.
    assert node.count_subscribers('/cam') == 0
    response = harness.call(Trigger, f'{NODE}/caption_now', Trigger.Request())
    assert not response.success and 'not active' in response.message
    wait_for(lambda: last_status(harness).message.startswith('inactive'),
             what='diagnostics saying inactive')

    assert change_state(harness, Transition.TRANSITION_ACTIVATE)
    assert get_state(harness) == 'active'
    camera = harness.publisher(Image, '/cam')
    frame = make_frame(1)
    caption = caption_one(harness, camera, frame, 1)
    assert caption == expected_caption(lively_opt_checkpoint, frame)
    response = harness.call(Trigger, f'{NODE}/caption_now', Trigger.Request())
    assert response.success and response.message == caption

    # Deactivated: frames get no captions, the model stays.
    assert change_state(harness, Transition.TRANSITION_DEACTIVATE)
    assert get_state(harness) == 'inactive' and node.captioner is not None
    published = len(harness.infos)
    wait_for(lambda: camera.get_subscription_count() == 0, what='the node to unsubscribe')
    for _ in range(5):
        camera.publish(image_message(frame))
        time.sleep(0.1)
    time.sleep(0.5)
    assert len(harness.infos) == published and len(harness.captions) == published

    # cleanup releases the model: its weights are no longer mapped.
    assert change_state(harness, Transition.TRANSITION_CLEANUP)
    assert get_state(harness) == 'unconfigured' and node.captioner is None
    wait_for(lambda: weights not in mapped_files(), what='the weights to be unmapped')
    assert not node._worker.is_alive()

    # And back: configure and activate again caption as before.
    assert change_state(harness, Transition.TRANSITION_CONFIGURE)
    assert change_state(harness, Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: camera.get_subscription_count() > 0, what='the node to subscribe again')
    assert caption_one(harness, camera, frame, published + 1) == caption

    # shutdown finalizes the node and tells main() to return.
    assert change_state(harness, Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert get_state(harness) == 'finalized'
    assert node.finished.result() == 0 and node.captioner is None
    wait_for(lambda: weights not in mapped_files(), what='the weights to be unmapped')


def test_a_transition_that_cannot_work_is_refused_and_the_node_stays(harness_factory,
                                                                     lively_opt_checkpoint):
    harness = harness_factory(lively_opt_checkpoint, ['/cam'], autostart=False)
    assert not change_state(harness, Transition.TRANSITION_ACTIVATE)  # not configured yet
    assert get_state(harness) == 'unconfigured'
    harness.node.set_parameters([Parameter('max_new_tokens', value=125)])
    # A caption longer than the model's positions: configure fails, saying why.
    assert not change_state(harness, Transition.TRANSITION_CONFIGURE)
    assert get_state(harness) == 'unconfigured' and harness.node.captioner is None
    wait_for(lambda: 'configure failed' in last_status(harness).message
             and 'max_new_tokens 125' in last_status(harness).message,
             what='diagnostics saying why configure failed')
    assert not harness.node.finished.done(), 'without autostart the node waits for another try'
    harness.node.set_parameters([Parameter('max_new_tokens', value=6)])
    assert change_state(harness, Transition.TRANSITION_CONFIGURE)
    assert get_state(harness) == 'inactive'


@pytest.fixture(scope='module')
def adapters(lively_opt_checkpoint, tmp_path_factory):
    """Two adapters for the lively OPT checkpoint, one for another model, and broken folders."""
    folder = tmp_path_factory.mktemp('adapters')
    damaged = make_adapter(lively_opt_checkpoint, folder / 'damaged', seed=9)
    (damaged / 'adapter_model.safetensors').write_bytes(b'not a safetensors file')
    (folder / 'no_config').mkdir()
    other_base = make_adapter(lively_opt_checkpoint, folder / 'other_base', seed=7)
    config_path = other_base / 'adapter_config.json'
    config = json.loads(config_path.read_text())
    config['base_model_name_or_path'] = '/models/blip2-flan-t5-xl'
    config_path.write_text(json.dumps(config))
    return {
        'first': make_adapter(lively_opt_checkpoint, folder / 'first', seed=5),
        'second': make_adapter(lively_opt_checkpoint, folder / 'second', seed=6),
        'other_base': other_base,
        'damaged': damaged,
        'no_config': folder / 'no_config',
    }


def test_adapter_swaps_at_run_time_and_refuses_what_cannot_load(
        harness_factory, lively_opt_checkpoint, adapters):
    harness = harness_factory(lively_opt_checkpoint, ['/cam'], max_new_tokens=6)
    node = harness.node
    camera = harness.publisher(Image, '/cam')
    frame = make_frame(3)
    base = expected_caption(lively_opt_checkpoint, frame)
    with_first = expected_caption(lively_opt_checkpoint, frame, adapters['first'])
    assert with_first != base, 'the adapter should change the caption'
    assert caption_one(harness, camera, frame, 1) == base

    # A good adapter: captions switch without a restart.
    assert set_adapter(harness, adapters['first']) == (True, '')
    wait_for(lambda: node.loaded_adapter == str(adapters['first']), what='the swap')
    count = len(harness.infos) + 1
    assert caption_one(harness, camera, frame, count) == with_first
    assert harness.infos[-1]['adapter'] == str(adapters['first'])

    # Refused at once, with the path and what is wrong.
    for name, expected in (('missing', 'no such folder'), ('no_config', 'adapter_config.json'),
                           ('other_base', 'was trained on')):
        path = adapters.get(name, '/no/such/adapter')
        successful, reason = set_adapter(harness, path)
        assert not successful and str(path) in reason and expected in reason, reason
    assert node.get_parameter('adapter').value == str(adapters['first'])

    # Fails only while loading: logged, reported, and the old adapter captions on.
    assert set_adapter(harness, adapters['damaged']) == (True, '')
    wait_for(lambda: node.adapter_problem and str(adapters['damaged']) in node.adapter_problem,
             what='the failed load to be reported')
    wait_for(lambda: str(adapters['damaged']) in last_status(harness).message,
             what='diagnostics naming the failed adapter')
    assert last_status(harness).level == last_status(harness).WARN
    wait_for(lambda: node.get_parameter('adapter').value == str(adapters['first']),
             what='the parameter to name the adapter in use again')
    count = len(harness.infos) + 1
    assert caption_one(harness, camera, frame, count) == with_first

    # '' goes back to the base model.
    assert set_adapter(harness, '') == (True, '')
    wait_for(lambda: node.loaded_adapter == '', what='the swap back')
    assert node.adapter_problem is None
    count = len(harness.infos) + 1
    assert caption_one(harness, camera, frame, count) == base


def test_repeated_adapter_swaps_do_not_leak_memory(harness_factory, lively_opt_checkpoint,
                                                   adapters, record_property):
    harness = harness_factory(lively_opt_checkpoint, ['/cam'], max_new_tokens=6)
    node = harness.node
    process = psutil.Process(os.getpid())

    def swap(adapter):
        assert set_adapter(harness, adapter) == (True, '')
        wait_for(lambda: node.loaded_adapter == str(adapter) and node._pending_swap is None
                 and node._adapter_loader is None, what=f'the swap to {adapter}')

    for adapter in (adapters['first'], adapters['second']):  # what the first swaps allocate
        swap(adapter)
    before = process.memory_info().rss
    for index in range(20):
        swap(adapters['first'] if index % 2 else adapters['second'])
    growth_mib = (process.memory_info().rss - before) / 2**20
    record_property('rss_growth_mib_over_20_swaps', round(growth_mib, 1))
    print(f'RSS growth over 20 adapter swaps: {growth_mib:.1f} MiB')
    # The tiny model's weights are about 2 MiB; a leak would keep one copy per swap.
    assert growth_mib < 20, f'{growth_mib:.1f} MiB more after 20 swaps'
    assert not any(thread.name == caption_node.ADAPTER_LOADER_THREAD
                   for thread in threading.enumerate())
    assert json.dumps(node.statistics())  # the counters survived the swaps


def test_a_destroyed_node_leaves_the_ros_graph(lively_opt_checkpoint):
    # rclpy's lifecycle node keeps its state machine, and with it the node, in the graph after
    # destroy_node(); a relaunched node or another test would then find two of the same name.
    harness = Harness(lively_opt_checkpoint, ['/cam'], namespace='/leaving')
    observer_context = rclpy.Context()
    rclpy.init(context=observer_context)
    try:
        observer = rclpy.create_node('graph_observer', context=observer_context)

        def in_graph():
            return ('blip2_caption', '/leaving') in observer.get_node_names_and_namespaces()
        wait_for(in_graph, what='the node to appear in the graph')
    finally:
        harness.close()
    try:
        wait_for(lambda: not in_graph(), timeout=5, what='the node to leave the graph')
    finally:
        rclpy.try_shutdown(context=observer_context)


def test_a_shutdown_while_autostart_loads_ends_the_start_quietly(lively_opt_checkpoint,
                                                                 monkeypatch):
    # Ctrl-C shuts the context down while the model loads: rclpy then cannot announce the end
    # of the configure transition, and autostart must stop there, without a traceback.
    loading, release = threading.Event(), threading.Event()

    def held(config):
        loading.set()
        release.wait(60)
        raise RuntimeError('the load ends with the test')
    monkeypatch.setattr(caption_node, 'make_captioner', held)
    errors = []
    monkeypatch.setattr(threading, 'excepthook', errors.append)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = caption_node.CaptionNode(context=context, parameter_overrides=[
        Parameter('model', value=str(lively_opt_checkpoint)),
        Parameter('image_topics', value=['/cam'])])
    try:
        assert loading.wait(60), 'the model never started loading'
        (autostart,) = [thread for thread in threading.enumerate()
                        if thread.name == caption_node.AUTOSTART_THREAD]
        rclpy.shutdown(context=context)
        autostart.join(60)
        assert not autostart.is_alive()
        assert [f'{error.exc_type.__name__}: {error.exc_value}' for error in errors] == []
        assert not node.finished.done(), 'a stop is not a failed start'
    finally:
        release.set()
        for thread in threading.enumerate():
            if thread.name == caption_node.INFERENCE_THREAD:
                thread.join(60)
        node.destroy_node()
        rclpy.try_shutdown(context=context)
