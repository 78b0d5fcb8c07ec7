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
The README against the code, so that it cannot drift.

The parameter table must be ``parameters_markdown()``; the topic, service and diagnostics
tables, the companion JSON example and the quoted warning are compared with a real caption node
running over DDS; the listener example is run against it; every command in a shell block is
parsed by the real argument parser of the module it names (or checked against the launch file,
the node's parameters and services); the quick start must be what CI and the scripts run.
"""

import argparse
import array
import ast
import importlib
import importlib.util
import json
import os
from pathlib import Path
import re
import shlex
import signal
import subprocess
import sys
import threading

from blip2_ros import caption_node as caption_node_module
from blip2_ros.caption_node import CaptionNode, NODE_NAME, parameters_markdown
from blip2_ros.demo import factory_camera as factory_camera_module
from blip2_ros.demo import run as demo_module
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from ros_harness import image_message, wait_for
from sensor_msgs.msg import Image
from std_msgs.msg import String

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text(encoding='utf-8')
TIMEOUT = 30.0
CAMERA = '/camera/image_raw'
COMPRESSED_CAMERA = '/camera/image_raw/compressed'
FRAME_STAMP = (1764230400, 500)
FRAME_ID = 'readme_camera'
# Node modules take ROS arguments; the others take argparse options.
ROS_NODE_MODULES = {'blip2_ros.caption_node': caption_node_module,
                    'blip2_ros.demo.factory_camera': factory_camera_module}
# Packages whose __main__ runs another module's main().
PACKAGE_MAINS = {'blip2_ros.demo': 'blip2_ros.demo.run'}
# Every command-line module the README teaches must have at least one command checked here.
DOCUMENTED_MODULES = {'blip2_ros.demo.run', 'blip2_ros.caption_node', 'blip2_ros.caption_images',
                      'blip2_ros.doctor', 'training.bag_to_coco', 'training.split',
                      'training.validate', 'training.train', 'training.evaluate'}


# ---------------------------------------------------------------------------------------------
# Reading the README


def code_blocks(text, languages):
    """Return the bodies of the fenced code blocks whose language is in ``languages``."""
    return [body for language, body in re.findall(r'^```(\w*)\n(.*?)^```', text,
                                                  re.MULTILINE | re.DOTALL)
            if language in languages]


def section(text, title):
    """Return a '## title' section up to the next heading of that level."""
    match = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## |\Z)', text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def tables(text):
    """Return every markdown table as a list of rows of cell strings (header first)."""
    found, current = [], []
    for line in text.splitlines() + ['']:
        if line.startswith('|'):
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
            if not all(re.fullmatch(r':?-+:?', cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table(header):
    """Return the body rows of the one README table whose header row is ``header``."""
    matches = [rows for rows in tables(README) if rows[0] == list(header)]
    assert len(matches) == 1, f'README needs exactly one table with header {header}'
    return matches[0][1:]


def code_spans(cell):
    """Return the `code` spans of a table cell."""
    return re.findall(r'`([^`]*)`', cell)


def shell_commands():
    """Yield every command of the README's bash blocks as a list of words."""
    for body in code_blocks(README, ('bash', 'sh', 'shell')):
        for line in body.replace('\\\n', ' ').splitlines():
            # A $(...) substitution is one word; shlex would split it.
            line = re.sub(r'\$\([^)]*\)', 'SUBSTITUTED', line)
            words = []
            for word in shlex.split(line, comments=True) + ['&&']:
                if word in ('&&', '||', ';', '|'):
                    while words and re.fullmatch(r'[A-Za-z_]\w*=.*', words[0]):
                        words.pop(0)  # VAR=value prefixes
                    if words:
                        yield words
                    words = []
                else:
                    words.append(word)


# ---------------------------------------------------------------------------------------------
# A real caption node, and traffic through it


class LiveNode:
    """A CaptionNode and a peer node spinning in a private context."""

    def __init__(self, checkpoint):
        """Start the node on two cameras (raw and compressed) with fast diagnostics."""
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = self.baseline = self.peer = self.executor = None
        try:
            self._start(checkpoint)
        except BaseException:
            # A node left spinning would answer the next test's calls under the same name.
            self.close()
            raise

    def _start(self, checkpoint):
        self.node = CaptionNode(context=self.context, parameter_overrides=[
            Parameter('model', value=str(checkpoint)),
            Parameter('image_topics', value=[CAMERA, COMPRESSED_CAMERA]),
            Parameter('diagnostics_period', value=0.2),
            Parameter('stale_input_timeout', value=1.0)])
        # What every rclpy node has (parameter services, /rosout, ...): not the README's business.
        self.baseline = rclpy.create_node('readme_baseline', context=self.context)
        self.peer = rclpy.create_node('readme_peer', context=self.context)
        self.infos, self.diagnostics = [], []
        self.peer.create_subscription(
            String, '/blip2/caption_info', lambda message: self.infos.append(message.data), 10)
        self.peer.create_subscription(DiagnosticArray, '/diagnostics',
                                      self.diagnostics.append, 10)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        for node in (self.node, self.baseline, self.peer):
            self.executor.add_node(node)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        # autostart loads the model in the background; the node subscribes once it is active.
        wait_for(lambda: self.node.lifecycle_state == 'active' or self.node.finished.done(),
                 what='the node to be active', timeout=60)
        assert self.node.lifecycle_state == 'active', self.node.configure_error

    def graph(self, query):
        """Return ``{name: types}`` for one graph query of the caption node, less the baseline."""
        endpoints = {'get_publisher_names_and_types_by_node': self.node.publishers,
                     'get_subscriber_names_and_types_by_node': self.node.subscriptions,
                     'get_service_names_and_types_by_node': self.node.services}[query]
        # A node of the same name that another test left in the graph must not count.
        local = {self.node.resolve_service_name(endpoint.srv_name) if hasattr(endpoint, 'srv_name')
                 else self.node.resolve_topic_name(endpoint.topic_name) for endpoint in endpoints}

        def own():
            return {name: tuple(types)
                    for name, types in getattr(self.node, query)(NODE_NAME, '/')
                    if name in local}

        # The graph cache learns of a node's own endpoints through discovery, a moment later.
        wait_for(lambda: set(own()) >= local, TIMEOUT, f'{query}: all endpoints in the graph')
        own = own()
        common = {name.replace('/readme_baseline/', f'/{NODE_NAME}/')
                  for name, _ in getattr(self.node, query)('readme_baseline', '/')}
        return {name: types for name, types in own.items() if name not in common}

    def close(self):
        """Stop spinning and tear the nodes down, however far the start got."""
        try:
            if self.executor is not None:
                self.executor.shutdown()
        finally:
            for node in (self.node, self.baseline, self.peer):
                if node is not None:
                    node.destroy_node()
            rclpy.try_shutdown(context=self.context)


@pytest.fixture(scope='module')
def live(lively_opt_checkpoint):
    """Run a caption node whose captions depend on the frame (non-empty)."""
    live_node = LiveNode(lively_opt_checkpoint)
    yield live_node
    live_node.close()


def readme_listener_code():
    """Return the README's rclpy listener example."""
    examples = [body for body in code_blocks(README, ('python',))
                if 'create_subscription' in body]
    assert len(examples) == 1, 'README needs one Python listener example'
    return examples[0]


@pytest.fixture(scope='module')
def traffic(live, tmp_path_factory):
    """
    Run the README's listener example, then send one good and one bad frame through the node.

    Returns the caption, its companion JSON, the last diagnostics status, and the example's
    output and exit status after Ctrl-C.
    """
    script = tmp_path_factory.mktemp('readme') / 'caption_listener.py'
    script.write_text(readme_listener_code(), encoding='utf-8')
    listener = subprocess.Popen([sys.executable, str(script)], cwd=script.parent,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(listener.stdout), daemon=True)
    reader.start()
    try:
        exchanged = _exchange(live, output)
    except AssertionError as error:
        raise AssertionError(f'{error}; listener example output:\n{"".join(output)}') from None
    finally:
        listener.send_signal(signal.SIGINT)
        try:
            returncode = listener.wait(timeout=20)
        except subprocess.TimeoutExpired:
            listener.kill()
            returncode = 'killed after Ctrl-C'
        reader.join(timeout=5)
    return {**exchanged, 'output': ''.join(output), 'returncode': returncode}


def _exchange(live, output):
    """Send a good and a bad frame; wait for the caption, the example's log and diagnostics."""
    # Captions are volatile: the example must be matched before anything is published.
    # The peer listens to /blip2/caption_info too, the example alone to /blip2/caption.
    wait_for(lambda: live.node.caption_publisher.get_subscription_count() >= 1
             and live.node.caption_info_publisher.get_subscription_count() >= 2,
             TIMEOUT, 'the listener example to subscribe')
    camera = live.peer.create_publisher(
        Image, CAMERA, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    wait_for(lambda: camera.get_subscription_count() > 0, TIMEOUT, 'the node to subscribe')
    frame = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    sec, nanosec = FRAME_STAMP
    camera.publish(image_message(frame, sec, FRAME_ID, stamp_nanosec=nanosec))
    wait_for(lambda: live.infos, TIMEOUT, 'a caption')
    info = json.loads(live.infos[0])
    caption = info['caption']
    assert caption, 'the lively checkpoint should give a non-empty caption'
    stamp_text = f'{FRAME_STAMP[0]}.{FRAME_STAMP[1]:09d}'
    expected_lines = [f'caption: {caption}', f'{CAMERA} @ {stamp_text}: {caption}']
    wait_for(lambda: all(any(line in printed for printed in output)
                         for line in expected_lines), TIMEOUT, 'the listener example to log')

    bad = image_message(frame, sec, FRAME_ID, stamp_nanosec=nanosec)
    bad.data = array.array('B', bytes(10))  # data shorter than step x height
    camera.publish(bad)

    def reported():
        for array_message in reversed(live.diagnostics):
            values = {item.key: item.value for item in array_message.status[0].values}
            if ('rejected_bad_size' in values
                    and f'no frames on {COMPRESSED_CAMERA}' in array_message.status[0].message):
                return array_message.status[0]
        return None
    wait_for(reported, TIMEOUT, 'diagnostics with the rejected frame and the stale camera')
    return {'caption': caption, 'info': info, 'status': reported(),
            'expected_lines': expected_lines}


# ---------------------------------------------------------------------------------------------
# Tables


def test_parameter_table_is_exactly_what_the_node_generates():
    match = re.search(r'<!-- parameters:begin -->\n(.*?)\n<!-- parameters:end -->', README,
                      re.DOTALL)
    assert match, 'README lacks the <!-- parameters:begin/end --> markers'
    assert match.group(1) == parameters_markdown()
    names = [code_spans(row[0])[0] for row in table(['name', 'default', 'changes at run time',
                                                     'what it does'])]
    assert names == [spec.name for spec in caption_node_module.PARAMETERS]


def qos_text(profile):
    """Describe a QoS profile in the words of the README's QoS column."""
    assert profile.history == HistoryPolicy.KEEP_LAST
    reliability = {ReliabilityPolicy.BEST_EFFORT: 'best effort',
                   ReliabilityPolicy.RELIABLE: 'reliable'}[profile.reliability]
    durability = {DurabilityPolicy.VOLATILE: 'volatile',
                  DurabilityPolicy.TRANSIENT_LOCAL: 'transient local'}[profile.durability]
    return f'{reliability}, keep last {profile.depth}, {durability}'


@pytest.mark.ros
def test_topic_table_lists_exactly_the_topics_the_node_creates(live):
    rows = table(['topic', 'direction', 'type', 'QoS', 'what'])
    documented = {(code_spans(row[0])[0], row[1]): (code_spans(row[2])[0], row[3].split(';')[0])
                  for row in rows}
    actual = {}
    for direction, query, endpoints in (
            ('subscribed', 'get_subscriber_names_and_types_by_node', live.node.subscriptions),
            ('published', 'get_publisher_names_and_types_by_node', live.node.publishers)):
        qos = {endpoint.topic_name: endpoint.qos_profile for endpoint in endpoints}
        for topic, types in live.graph(query).items():
            assert len(types) == 1
            actual[(topic, direction)] = (types[0], qos_text(qos[topic]))
    assert documented == actual


@pytest.mark.ros
def test_service_table_lists_exactly_the_services_the_node_offers(live):
    rows = table(['service', 'type', 'what'])
    documented = {code_spans(row[0])[0]: code_spans(row[1])[0] for row in rows}
    actual = {name: types[0] for name, types in
              live.graph('get_service_names_and_types_by_node').items()}
    assert documented == actual


def conversion_reasons():
    """Return every ``reason`` image_conversion raises ImageConversionError with."""
    tree = ast.parse((ROOT / 'blip2_ros' / 'image_conversion.py').read_text(encoding='utf-8'))
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
            'ImageConversionError' and isinstance(node.args[0], ast.Constant)}


def key_pattern(key):
    """Turn a README diagnostics key such as 'received <topic>' into a regex."""
    parts = re.split(r'(<topic>|<reason>)', key)
    placeholders = {'<topic>': r'/\S+', '<reason>': r'[a-z_]+'}
    return re.compile(''.join(placeholders.get(part, re.escape(part)) for part in parts))


@pytest.mark.ros
def test_diagnostics_table_names_every_value_the_node_reports(traffic):
    rows = table(['key', 'meaning'])
    keys = [code_spans(row[0])[0] for row in rows]
    actual = [item.key for item in traffic['status'].values]
    for key in actual:
        assert any(key_pattern(documented).fullmatch(key) for documented in keys), (
            f"the node reports '{key}' but the README's diagnostics table lacks it")
    for documented in keys:
        assert any(key_pattern(documented).fullmatch(key) for key in actual), (
            f"the README documents '{documented}' but the node does not report it")
    reasons_row = next(row for row in rows if code_spans(row[0])[0] == 'rejected_<reason>')
    # The node's subscriptions are typed, so it never sees a message that is not an image.
    assert set(code_spans(reasons_row[1])) == conversion_reasons() - {'not_an_image'}
    assert f'`{traffic["status"].name}`' in README


@pytest.mark.ros
def test_stale_camera_warning_is_quoted_as_the_node_words_it(traffic):
    problems = traffic['status'].message.split('; ')
    stale = next(problem for problem in problems if COMPRESSED_CAMERA in problem)
    default = next(spec.default for spec in caption_node_module.PARAMETERS
                   if spec.name == 'stale_input_timeout')
    quoted = re.sub(r'on \S+ for \S+ s', f'on {CAMERA} for {default:g} s', stale)
    assert f'`{quoted}`' in README


# ---------------------------------------------------------------------------------------------
# The examples


@pytest.mark.ros
def test_listener_example_logs_each_caption_and_its_frame_then_stops_on_ctrl_c(traffic):
    for line in traffic['expected_lines']:
        assert line in traffic['output'], traffic['output']
    assert traffic['returncode'] == 0, traffic['output']
    assert 'Traceback' not in traffic['output']


@pytest.mark.ros
def test_caption_info_example_has_the_fields_and_types_the_node_publishes(traffic):
    examples = [json.loads(body) for body in code_blocks(README, ('json',))
                if '"source_topic"' in body]
    assert len(examples) == 1, 'README needs one JSON example of /blip2/caption_info'
    example, info = examples[0], traffic['info']
    assert {key: type(value) for key, value in example.items()} == {
        key: type(value) for key, value in info.items()}
    assert example['stamp'].keys() == info['stamp'].keys()
    assert info['stamp'] == {'sec': FRAME_STAMP[0], 'nanosec': FRAME_STAMP[1]}
    assert info['frame_id'] == FRAME_ID and info['source_topic'] == CAMERA
    fields = {span for row in table(['field', 'meaning']) for span in code_spans(row[0])}
    assert fields == set(info)


# ---------------------------------------------------------------------------------------------
# Commands


class _ParserCaptured(Exception):
    def __init__(self, parser):
        super().__init__('parser captured')
        self.parser = parser


def command_line_parser(module_name, monkeypatch):
    """Return the argparse parser a module's main() builds, stopping it before it parses."""
    def capture(parser, args=None, namespace=None):
        raise _ParserCaptured(parser)

    module = importlib.import_module(module_name)
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, 'parse_known_args', capture)
        try:
            module.main([])
        except _ParserCaptured as captured:
            return captured.parser
    raise AssertionError(f'{module_name}.main() did not parse a command line')


def check_argparse_command(module_name, words, parsers, monkeypatch, capsys):
    """Parse ``words`` with the module's own parser: no unknown or abbreviated options."""
    if module_name not in parsers:
        parsers[module_name] = command_line_parser(module_name, monkeypatch)
    parser = parsers[module_name]
    try:
        _, unknown = parser.parse_known_args(words)
    except SystemExit:
        raise AssertionError(f'{module_name} rejects README arguments {words}: '
                             f'{capsys.readouterr().err.strip()}') from None
    assert not unknown, f'{module_name} does not know {unknown} (README: {words})'
    for word in words:
        option = word.split('=')[0]
        if option.startswith('--'):
            assert option in parser._option_string_actions, (
                f'{module_name}: README abbreviates or misspells {option}')


def check_ros_arguments(module, words):
    """Parse ``--ros-args`` with rclpy and check every override against the node's parameters."""
    assert words[0] == '--ros-args', f'{module.__name__} takes ROS arguments only: {words}'
    words = list(words)
    for index, word in enumerate(words):
        if word == '--params-file' and (ROOT / words[index + 1]).is_file():
            words[index + 1] = str(ROOT / words[index + 1])
    overrides, standard = {}, set()
    for arguments in (words, []):
        context = rclpy.Context()
        rclpy.init(args=['node', *arguments], context=context)
        try:
            node = rclpy.create_node('readme_ros_args', context=context,
                                     allow_undeclared_parameters=True,
                                     automatically_declare_parameters_from_overrides=True)
            found = node.get_parameters_by_prefix('')
            node.destroy_node()
        finally:
            rclpy.try_shutdown(context=context)
        if arguments:
            overrides = found
        else:
            standard = set(found)  # what every node has (use_sim_time, ...)
    overrides = {name: value for name, value in overrides.items() if name not in standard}
    assert overrides, f'no parameters in README command {words}'
    specs = {spec.name: spec for spec in module.PARAMETERS}
    for name, parameter in overrides.items():
        assert name in specs, f'{module.__name__} has no parameter {name}'
        assert type(parameter.value) is type(specs[name].default), (
            f'README gives {name} a {type(parameter.value).__name__}, the node declares '
            f'{type(specs[name].default).__name__}')


def console_scripts():
    """Return ``{executable: module}`` from setup.py's console_scripts."""
    text = (ROOT / 'setup.py').read_text(encoding='utf-8')
    return dict(re.findall(r"'(\w+) = ([\w.]+):main'", text))


def launch_arguments():
    """Return the names caption.launch.py declares with DeclareLaunchArgument."""
    tree = ast.parse((ROOT / 'launch' / 'caption.launch.py').read_text(encoding='utf-8'))
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, 'id', '') ==
            'DeclareLaunchArgument'}


@pytest.mark.ros
def test_every_command_uses_real_modules_options_parameters_and_names(live, monkeypatch,
                                                                      capsys):
    scripts = console_scripts()
    topics = set(live.graph('get_publisher_names_and_types_by_node')) | set(
        live.graph('get_subscriber_names_and_types_by_node'))
    services = {name: types[0] for name, types in
                live.graph('get_service_names_and_types_by_node').items()}
    runtime = {spec.name for spec in caption_node_module.PARAMETERS if not spec.read_only}
    parsers, checked = {}, set()

    def check_module(module_name, words):
        # A package run with -m runs its __main__, which hands over to one module's main().
        module_name = PACKAGE_MAINS.get(module_name, module_name)
        checked.add(module_name)
        if module_name in ROS_NODE_MODULES:
            check_ros_arguments(ROS_NODE_MODULES[module_name], words)
        else:
            check_argparse_command(module_name, words, parsers, monkeypatch, capsys)

    for words in shell_commands():
        program = os.path.basename(words[0])
        if re.fullmatch(r'python(3(\.\d+)?)?', program) and words[1:2] == ['-m']:
            if words[2].split('.')[0] in ('blip2_ros', 'training'):
                check_module(words[2], words[3:])
            else:
                # Someone else's tool (venv, colcon): it must at least exist.
                assert importlib.util.find_spec(words[2]), words
        elif words[0] == './run_demo.sh':
            check_module('blip2_ros.demo', words[1:])
        elif words[:2] == ['ros2', 'run']:
            assert words[2] == 'blip2_ros' and words[3] in scripts, words
            check_module(scripts[words[3]], words[4:])
        elif words[:2] == ['ros2', 'launch']:
            assert words[2] == 'blip2_ros' and (ROOT / 'launch' / words[3]).is_file(), words
            for argument in words[4:]:
                assert argument.split(':=')[0] in launch_arguments(), argument
            checked.add('launch')
        elif words[:3] == ['ros2', 'service', 'call']:
            assert services.get(words[3]) == words[4], f'no service {words[3]} {words[4]}'
            checked.add('service')
        elif words[:2] == ['ros2', 'lifecycle']:
            # The verb's transition labels are the node's own ('configure', 'shutdown', ...).
            labels = {description[1] for description in
                      live.node._state_machine.transition_graph}
            assert words[3] == f'/{NODE_NAME}', words
            assert words[2] == 'get' or (words[2] == 'set' and words[4] in labels), words
            checked.add('lifecycle')
        elif words[:3] == ['ros2', 'param', 'set']:
            assert words[3] == f'/{NODE_NAME}' and words[4] in runtime, words
            checked.add('param')
        elif words[:2] == ['ros2', 'topic'] and words[2] in ('echo', 'info'):
            topic = [word for word in words[3:] if word.startswith('/')][0]
            assert topic in topics, f'the node has no topic {topic}'
        elif words[:2] == ['pip', 'install'] and '-r' in words:
            requirements = words[words.index('-r') + 1]
            assert (ROOT / os.path.basename(requirements)).is_file(), requirements
    assert checked >= DOCUMENTED_MODULES | {'launch', 'service', 'param', 'lifecycle'}


def test_quick_start_is_the_two_scripts_that_ci_and_setup_really_use():
    quick_start = section(README, 'Quick start')
    block = code_blocks(quick_start, ('bash',))[0]
    commands = [line.strip() for line in block.splitlines()
                if line.strip() and not line.strip().startswith('#')]
    assert commands == ['./run_demo.sh', './run_tests.sh']

    ci_script = ROOT / '.ci' / 'run'
    assert os.access(ci_script, os.X_OK)
    ci_commands = [shlex.split(line) for line in ci_script.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith('#')]
    assert any(words[0] == './run_tests.sh' for words in ci_commands), (
        '.ci/run must call the README test command')
    for script, runs in (('run_demo.sh', '-m blip2_ros.demo'), ('run_tests.sh', '-m pytest')):
        path = ROOT / script
        assert os.access(path, os.X_OK), f'{script} is not executable'
        text = path.read_text()
        assert 'scripts/setup_env.sh' in text and runs in text, script
    setup = (ROOT / 'scripts' / 'setup_env.sh').read_text()
    assert '-m venv' in setup and 'pip install' in setup and 'requirements.txt' in setup
    version = re.search(r'sys\.version_info\[:2\] != \((\d+), (\d+)\)', setup)
    assert version, 'setup_env.sh no longer checks the Python version'
    prose = ' '.join(quick_start.split())
    assert f'Python {version.group(1)}.{version.group(2)}' in prose
    assert f'after {demo_module.parse_args([]).frames} captions' in prose


def without_code(text):
    """Return a markdown text without its fenced code blocks."""
    return re.sub(r'^```.*?^```', '', text, flags=re.MULTILINE | re.DOTALL)


def heading_anchors(text):
    """Return GitHub's anchors for the headings of a markdown text."""
    headings = re.findall(r'^#+ (.+)$', without_code(text), re.MULTILINE)
    return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}


def test_relative_links_and_anchors_exist():
    links = re.findall(r'\]\(([^)\s]+)\)', without_code(README))
    local = [link for link in links if not re.match(r'[a-z]+:', link)]
    assert local
    for link in local:
        path, _, anchor = link.partition('#')
        target = ROOT / path if path else ROOT / 'README.md'
        assert target.exists(), f'README links to {path}, which does not exist'
        if anchor:
            assert anchor in heading_anchors(target.read_text(encoding='utf-8')), link
