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
The demo: a synthetic factory camera and the caption node, captions printed next to the truth.

    python -m blip2_ros.demo                  # 30 captions with the bundled demo model
    python -m blip2_ros.demo --forever        # until Ctrl-C
    python -m blip2_ros.demo --from-scratch   # record, convert, split, train, evaluate, then live
    python -m blip2_ros.demo --fine-tune      # teach the demo model a second line, base vs tuned
    python -m blip2_ros.demo --vllm           # the model on a local vLLM server (.venv/vllm)

Both nodes run as their own processes with the same parameter file the launch file uses, on
localhost-only DDS in a domain of their own, so nothing leaves this machine and no other ROS
graph is disturbed. The camera holds its first frame until the caption node has subscribed,
and a listener here matches each caption to the true caption of the frame it describes (by
the frame's stamp).
"""

import argparse
from collections import OrderedDict
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from blip2_ros.demo.isolation import (child_environment, isolate_ros, PACKAGE_PARENT,
                                      parent_death_signal, share_path)

DEMO_MODEL_NAME = 'factory-tiny'
RECIPE_FILE = 'demo_recipe.json'
CAMERA_TOPIC = '/camera/image_raw'
TRUTH_TOPIC = '/factory/truth'
INFO_TOPIC = '/blip2/caption_info'
DEFAULT_SIZE = (160, 120)
# Truths of frames whose captions never came (the node skips frames when busy) are dropped.
MAX_PENDING_TRUTHS = 1000
EXIT_ERROR = 2
EXIT_BELOW_ACCURACY = 3
# Seconds the nodes get to stop after SIGINT before they are killed.
STOP_GRACE_SEC = 20.0
# --vllm: the name the local server serves the model under, and how long it may take to start.
DEMO_SERVED_NAME = 'blip2-demo'
SERVER_START_TIMEOUT = 300.0


class DemoError(RuntimeError):
    """Something the user can fix; the message is one line."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, taken down the same path as Ctrl-C so the nodes are stopped."""

    def __init__(self, signum):
        """Remember which signal it was, for the exit status."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def demo_model_path():
    """Return the folder of the bundled demo model."""
    return share_path('models', DEMO_MODEL_NAME)


def default_work_dir(*parts):
    """Return a work folder (default demo_output/) in a source checkout, else in the cwd."""
    parts = parts or ('demo_output',)
    if os.path.isfile(os.path.join(PACKAGE_PARENT, 'package.xml')):
        return os.path.join(PACKAGE_PARENT, *parts)
    return os.path.abspath(os.path.join(*parts))


def recorded_frame_size(model):
    """Return the (width, height) a demo model was trained on, or the default camera size."""
    recipe = os.path.join(model, RECIPE_FILE)
    if not os.path.isfile(recipe):
        return DEFAULT_SIZE
    try:
        with open(recipe, encoding='utf-8') as stream:
            width, height = json.load(stream)['size']
        return int(width), int(height)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DemoError(f"{recipe} has no usable 'size' [width, height] ({error}); "
                        'pass --size WIDTHxHEIGHT') from None


class NodeProcess:
    """
    A node running as a child process, in a session of its own so Ctrl-C reaches us first.

    On Linux the child gets SIGTERM when this process dies, even by SIGKILL, so no node is
    left running without the demo.
    """

    def __init__(self, title, argv, module=True, log_path=None):
        """
        Start ``python -m <argv>`` (``python <argv>`` if not ``module``); ``title`` names it.

        With ``log_path`` its output goes to that file instead of the terminal.
        """
        self.title = title
        self.log_path = log_path
        command = [sys.executable, '-m', *argv] if module else [sys.executable, *argv]
        output = open(log_path, 'ab') if log_path else None
        try:
            self.process = subprocess.Popen(command, env=child_environment(), stdout=output,
                                            stderr=subprocess.STDOUT if output else None,
                                            start_new_session=True,
                                            preexec_fn=parent_death_signal())
        finally:
            if output:
                output.close()  # the child has its own copy

    def check(self):
        """Raise DemoError if the process has exited."""
        code = self.process.poll()
        if code is not None:
            where = f'its log is {self.log_path}' if self.log_path else 'its message is above'
            raise DemoError(f'the {self.title} exited with code {code}; {where}')

    def interrupt(self):
        """Ask the node to stop as Ctrl-C would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def wait(self, timeout):
        """Wait up to ``timeout`` seconds for the node to exit; return whether it has."""
        try:
            self.process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self):
        """Kill the node if it still runs and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def stop_nodes(nodes, grace_sec=STOP_GRACE_SEC):
    """
    Stop every node: SIGINT to all, then wait; kill what is left after ``grace_sec``.

    A second Ctrl-C (or SIGTERM) while waiting kills what is left at once; return True then.
    """
    interrupted = False
    try:
        # All are signalled before any wait, so one slow node cannot keep another running.
        for node in nodes:
            node.interrupt()
        deadline = time.monotonic() + grace_sec
        for node in nodes:
            node.wait(deadline - time.monotonic())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for node in nodes:
            node.kill()
    return interrupted


def model_image_size(model):
    """Return the input size (pixels, square) in a checkpoint folder's processor settings."""
    for name in ('processor_config.json', 'preprocessor_config.json'):
        path = os.path.join(model, name)
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as stream:
                settings = json.load(stream)
            size = settings.get('image_processor', settings).get('size', {})
            return int(size.get('height') or size.get('shortest_edge') or 224)
    return 224


def wait_for_server(server_url, server, timeout=SERVER_START_TIMEOUT):
    """Wait until the vLLM server at ``server_url`` answers GET /health."""
    import urllib.error
    import urllib.request

    health = server_url.rstrip('/').rsplit('/v1', 1)[0] + '/health'
    deadline = time.monotonic() + timeout
    while True:
        if server is not None:
            server.check()
        try:
            with urllib.request.urlopen(health, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DemoError(f'the vLLM server at {server_url} did not answer within '
                            f'{timeout:.0f} s')
        time.sleep(0.5)


def start_vllm_server(model, port):
    """Serve ``model`` with vLLM on 127.0.0.1:``port`` (scripts/serve_vllm.py); NodeProcess."""
    script = share_path('scripts', 'serve_vllm.py')
    if not os.path.isfile(script):
        raise DemoError('--vllm needs scripts/serve_vllm.py of a source checkout')
    log_path = os.path.join(tempfile.gettempdir(), f'blip2_ros_demo_vllm_{port}.log')
    # The demo's own requests are few: eager mode starts in under a minute instead of two.
    return NodeProcess('vLLM server', [script, model, '--port', str(port),
                                       '--served-model-name', DEMO_SERVED_NAME,
                                       '--enforce-eager'], module=False, log_path=log_path)


def start_nodes(model, width, height, rate_hz, seed, prompt, server_url=''):
    """
    Start the camera node and the caption node; return both as NodeProcess.

    With ``server_url`` the caption node captions through the vLLM server there, which serves
    ``model`` as DEMO_SERVED_NAME.
    """
    camera_args = [
        'blip2_ros.demo.factory_camera', '--ros-args',
        '-p', f'topic:={CAMERA_TOPIC}', '-p', f'rate_hz:={float(rate_hz)}',
        '-p', f'width:={width}', '-p', f'height:={height}', '-p', f'seed:={seed}',
        '-p', f'truth_topic:={TRUTH_TOPIC}', '-p', 'reliability:=reliable',
        # The first frames would go nowhere while the caption node loads its model.
        '-p', 'wait_for_subscribers:=1', '--log-level', 'warn']
    caption_args = [
        'blip2_ros.caption_node', '--ros-args',
        '--params-file', share_path('config', 'caption_node.yaml'),
        '-p', f'model:={model}', '-p', f'image_topics:=[{CAMERA_TOPIC}]',
        '-p', f'caption_info_topic:={INFO_TOPIC}', '-p', 'local_files_only:=true']
    if prompt:
        # A JSON string is a YAML string, so colons and question marks stay text.
        caption_args += ['-p', f'prompt:={json.dumps(prompt)}']
    if server_url:
        caption_args += ['-p', 'backend:=openai', '-p', f'server_url:={server_url}',
                         '-p', f'model:={DEMO_SERVED_NAME}',
                         '-p', f'server_image_size:={model_image_size(model)}']
    nodes = []
    try:
        nodes.append(NodeProcess('camera node', camera_args))
        nodes.append(NodeProcess('caption node', caption_args))
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


class Scoreboard:
    """Match captions to the truth of the frame they describe and keep the running score."""

    def __init__(self, frames, out=sys.stdout):
        """Stop after ``frames`` matched captions (0: never)."""
        self.frames = frames
        self.out = out
        self.truth_by_stamp = OrderedDict()
        self.matched = 0
        self.correct = 0
        self.latencies_ms = []
        self.done = threading.Event()
        # The signal that cut the run short (SIGINT for Ctrl-C), or None.
        self.interrupted_by = None

    def on_truth(self, message):
        """Remember the true caption of a frame by its stamp."""
        truth = json.loads(message.data)
        stamp = (truth['stamp']['sec'], truth['stamp']['nanosec'])
        self.truth_by_stamp[stamp] = truth['caption']
        while len(self.truth_by_stamp) > MAX_PENDING_TRUTHS:
            self.truth_by_stamp.popitem(last=False)

    def on_caption(self, message):
        """Score a caption against the truth of its frame and print one line."""
        info = json.loads(message.data)
        stamp = (info['stamp']['sec'], info['stamp']['nanosec'])
        true_caption = self.truth_by_stamp.pop(stamp, None)
        if true_caption is None or self.done.is_set():
            return
        # Stamps are the camera's wall-clock time on this same machine.
        latency_ms = (time.time() - stamp[0] - stamp[1] * 1e-9) * 1000.0
        caption = info['caption'].strip()
        hit = caption == true_caption
        self.matched += 1
        self.correct += hit
        self.latencies_ms.append(latency_ms)
        self.out.write(
            f"{self.matched:4d} {'ok  ' if hit else 'MISS'} caption: {caption:36} "
            f'truth: {true_caption:36} accuracy {self.accuracy:6.1%}  '
            f'latency {latency_ms:5.0f} ms\n')
        self.out.flush()
        if self.frames and self.matched >= self.frames:
            self.done.set()

    @property
    def accuracy(self):
        """Exact-match rate so far."""
        return self.correct / self.matched if self.matched else 0.0

    def latency_p50(self):
        """Median frame-to-caption latency in ms (0 before any caption)."""
        latencies = sorted(self.latencies_ms)
        return latencies[len(latencies) // 2] if latencies else 0.0


class Listener:
    """A node in this process that feeds truths and captions to the scoreboard."""

    def __init__(self, scoreboard):
        """Subscribe before the nodes start, so no truth is published before we listen."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from rclpy.signals import SignalHandlerOptions
        from std_msgs.msg import String

        self.context = rclpy.Context()
        # Ctrl-C stays a plain KeyboardInterrupt here; the nodes are stopped in order.
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node('blip2_demo_scoreboard', context=self.context)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(String, TRUTH_TOPIC, scoreboard.on_truth, qos)
        self.node.create_subscription(String, INFO_TOPIC, scoreboard.on_caption, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def spin_once(self, timeout_sec):
        """Handle what has arrived, waiting at most ``timeout_sec``."""
        self.executor.spin_once(timeout_sec=timeout_sec)

    def close(self):
        """Leave the ROS graph."""
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def watch(scoreboard, listener, nodes, timeout):
    """Listen until the scoreboard is done; DemoError when a node dies or time is up."""
    deadline = time.monotonic() + timeout if timeout else None
    while not scoreboard.done.is_set():
        listener.spin_once(0.1)
        for node in nodes:
            node.check()
        if deadline and time.monotonic() > deadline:
            if not scoreboard.matched:
                raise DemoError(f'no captions arrived in {timeout:g} s; check the messages of '
                                'the nodes above, or raise --timeout on a slow machine')
            raise DemoError(f'only {scoreboard.matched} of {scoreboard.frames} captions arrived '
                            f'in {timeout:g} s; raise --timeout or lower --frames')


def run_live(model, frames, rate_hz, width, height, seed, prompt, timeout, out=sys.stdout,
             server_url='', start_server=False):
    """Run the camera and caption nodes and print captions next to the truth."""
    out.write(f'model: {model}\ncamera: {width}x{height} at {rate_hz:g} Hz on {CAMERA_TOPIC} '
              f"(scene stream {seed}), ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, localhost "
              'only\n')
    out.flush()
    scoreboard = Scoreboard(frames, out)
    listener = Listener(scoreboard)
    nodes = []
    try:
        if start_server:
            port = _free_port()
            server_url = f'http://127.0.0.1:{port}/v1'
            nodes.append(start_vllm_server(model, port))
            out.write(f'starting a vLLM server on {server_url} (about a minute on a CPU; its '
                      f'log: {nodes[0].log_path})...\n')
            out.flush()
            wait_for_server(server_url, nodes[0])
        if server_url:
            out.write(f'captioning through the vLLM server at {server_url}\n')
        out.write('waiting for the caption node to load the model...\n')
        out.flush()
        nodes += start_nodes(model, width, height, rate_hz, seed, prompt, server_url)
        watch(scoreboard, listener, nodes, timeout)
    except KeyboardInterrupt as error:
        scoreboard.interrupted_by = getattr(error, 'signum', signal.SIGINT)
    finally:
        if stop_nodes(nodes) and scoreboard.interrupted_by is None:
            scoreboard.interrupted_by = signal.SIGINT
        listener.close()
        if scoreboard.matched:
            out.write(f'\n{scoreboard.correct} of {scoreboard.matched} captions equal the truth '
                      f'({scoreboard.accuracy:.1%}); frame-to-caption latency p50 '
                      f'{scoreboard.latency_p50():.0f} ms\n')
            out.flush()
    return scoreboard


def parse_args(argv):
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog='python -m blip2_ros.demo', description=__doc__.strip().splitlines()[0])
    parser.add_argument('--model', default='', help='BLIP-2 checkpoint (hub id or folder); '
                        'default: the bundled demo model')
    parser.add_argument('--frames', type=int, default=30,
                        help='stop after this many captions (default 30)')
    parser.add_argument('--forever', action='store_true', help='run until Ctrl-C')
    parser.add_argument('--rate-hz', type=float, default=5.0,
                        help='camera frame rate (default 5)')
    parser.add_argument('--size', default='', help='camera frame size WIDTHxHEIGHT '
                        '(default: what the demo model was trained on)')
    parser.add_argument('--seed', type=int, default=2026, help='scene stream of the camera; '
                        'the demo model never saw the default one')
    parser.add_argument('--prompt', default='', help='caption prompt')
    parser.add_argument('--timeout', type=float, default=300.0,
                        help='give up if the captions have not arrived after this many seconds')
    parser.add_argument('--min-accuracy', type=float, default=0.0,
                        help=f'exit with status {EXIT_BELOW_ACCURACY} when the exact-match rate '
                        'ends below this (0..1)')
    parser.add_argument('--from-scratch', action='store_true',
                        help='record a synthetic bag, convert, split, train and evaluate a new '
                        'model, then caption live with it')
    parser.add_argument('--fine-tune', action='store_true',
                        help='teach the demo model a second production line (line2: white and '
                        'black items "on the belt", words it never learned): record, '
                        'fine-tune, evaluate, then print base vs fine-tuned exact match on '
                        'both lines (about 5 minutes on 2 CPU cores)')
    parser.add_argument('--work-dir', default='',
                        help='where --from-scratch writes the bag, dataset and model '
                        '(default: demo_output/), and --fine-tune (default: work/line2/)')
    parser.add_argument('--train-frames', type=int, default=0,
                        help='--from-scratch: frames to record (default: as the bundled model)')
    parser.add_argument('--train-steps', type=int, default=0,
                        help='--from-scratch: training steps (default: as the bundled model, '
                        '3000, about 12 minutes in all on 2 CPU cores; fewer steps finish '
                        'sooner and caption worse); --fine-tune: fine-tuning steps (default '
                        '3000)')
    parser.add_argument('--vllm', action='store_true',
                        help='serve the model with a local vLLM server (the vLLM environment '
                        'scripts/setup_env.sh makes in .venv/vllm) and caption through it')
    parser.add_argument('--server-url', default='',
                        help=f'caption through a running vLLM server at this URL that serves '
                        f"the model as '{DEMO_SERVED_NAME}' (scripts/serve_vllm.py MODEL "
                        f'--served-model-name {DEMO_SERVED_NAME})')
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error('--frames must be at least 1')
    if not 0.0 <= args.min_accuracy <= 1.0:
        parser.error('--min-accuracy is a fraction between 0 and 1, e.g. 0.9')
    if args.vllm and args.server_url:
        parser.error('--vllm starts a server of its own: leave out --server-url')
    if args.fine_tune and (args.from_scratch or args.model or args.vllm or args.server_url):
        parser.error('--fine-tune fine-tunes the bundled demo model and prints scores: leave '
                     'out --from-scratch, --model, --vllm and --server-url')
    return args


def _free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def _frame_size(args, model):
    if not args.size:
        return recorded_frame_size(model)
    try:
        width, height = (int(value) for value in args.size.lower().split('x'))
    except ValueError:
        raise DemoError(f"--size must look like 160x120, not '{args.size}'") from None
    if min(width, height) < 16:
        raise DemoError(f'--size {args.size} is too small: both sides need 16 px or more')
    return width, height


def scratch_recipe(train_steps=0, train_frames=0):
    """Return the bundled model's recipe with --train-steps and --train-frames applied."""
    from dataclasses import replace

    from training.demo_model import DemoRecipe

    if train_steps < 0 or train_frames < 0:
        raise DemoError('--train-steps and --train-frames must be positive')
    recipe = DemoRecipe()
    if train_frames:
        recipe = replace(recipe, frames=train_frames)
    if train_steps:
        # Warm-up is a share of the run, as in the bundled recipe (200 of 3000 steps).
        recipe = replace(recipe, max_steps=train_steps, warmup_steps=min(
            recipe.warmup_steps, train_steps * recipe.warmup_steps // recipe.max_steps))
    return recipe


def expected_minutes(recipe):
    """Say how long --from-scratch takes, scaled from the bundled model's measured stages."""
    from training.demo_model import RECIPE_FILE

    try:
        with open(os.path.join(demo_model_path(), RECIPE_FILE), encoding='utf-8') as stream:
            built = json.load(stream)
        stages = built['results']['stage_seconds']
        steps, frames = built['recipe']['max_steps'], built['recipe']['frames']
    except (OSError, ValueError, KeyError):
        return 'time unknown (the bundled model has no measured recipe)'
    seconds = (stages['train'] * recipe.max_steps / steps
               + (stages['record'] + stages['convert']) * recipe.frames / frames
               + stages['split'] + stages['evaluate'])
    return f'about {max(1, round(seconds / 60))} min'


def _training_module(option, name):
    """Import ``training.<name>`` for ``option``; DemoError says what to install if it fails."""
    import importlib

    # Only these modes need the training package (and its extra dependencies).
    try:
        module = importlib.import_module(f'training.{name}')
    except ImportError as error:
        raise DemoError(f'{option} needs the training package and its dependencies '
                        f'({error}); install requirements-ml.txt') from None
    # The stages report through logging; show them, they take minutes.
    logging.basicConfig(format='%(asctime)s %(name)s: %(message)s', level=logging.INFO)
    return module


def fine_tune(args, out=sys.stdout):
    """Run training.finetune_demo (--fine-tune) and print its table; return the exit status."""
    finetune_demo = _training_module('--fine-tune', 'finetune_demo')
    try:
        recipe = finetune_demo.FinetuneRecipe()
        if args.train_steps:
            recipe = finetune_demo.with_steps(recipe, args.train_steps)
        print(f'--fine-tune: {recipe.max_steps} fine-tuning steps; '
              f'{finetune_demo.expected_minutes(recipe)} on 2 CPU cores', file=sys.stderr)
        results = finetune_demo.run(args.work_dir or default_work_dir('work', 'line2'),
                                    recipe, demo_model_path())
    except (finetune_demo.FinetuneDemoError, finetune_demo.DemoModelError) as error:
        raise DemoError(str(error)) from None
    print(finetune_demo.side_by_side(results), file=out)
    return 0


def _choose_model(args):
    if args.from_scratch:
        if args.model:
            raise DemoError('--from-scratch trains its own model: leave out --model')
        demo_model = _training_module('--from-scratch', 'demo_model')
        try:
            recipe = scratch_recipe(args.train_steps, args.train_frames)
            print(f'--from-scratch: {recipe.frames} frames, {recipe.max_steps} training steps; '
                  f'{expected_minutes(recipe)} on the machine that built the bundled model',
                  file=sys.stderr)
            return demo_model.reproduce(args.work_dir or default_work_dir(), recipe=recipe)
        except demo_model.DemoModelError as error:
            raise DemoError(str(error)) from None
    if args.model:
        if os.path.isdir(args.model):
            # The caption node runs in its own process; a relative folder must still resolve.
            return os.path.abspath(args.model)
        if args.model.startswith(('.', os.sep, '~')) or args.model.count('/') > 1:
            raise DemoError(f"model folder '{args.model}' does not exist")
        return args.model  # a hub id, loaded from the local cache
    model = demo_model_path()
    if not os.path.isfile(os.path.join(model, 'config.json')):
        raise DemoError(f'the demo model is missing from {model}; run with --from-scratch to '
                        'train one')
    return model


def main(argv=None):
    """Run the demo; return the exit status."""
    args = parse_args(argv)
    isolate_ros()
    # Killing the demo or closing its terminal must stop the nodes just as Ctrl-C does.
    previous_handlers = {signum: signal.signal(signum, _raise_interrupted)
                         for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if args.fine_tune:
            return fine_tune(args)
        model = _choose_model(args)
        width, height = _frame_size(args, model)
        scoreboard = run_live(model, 0 if args.forever else args.frames, args.rate_hz, width,
                              height, args.seed, args.prompt, 0 if args.forever else args.timeout,
                              server_url=args.server_url, start_server=args.vllm)
    except DemoError as error:
        print(f'error: {error}', file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as error:
        # Interrupted before the nodes started (e.g. while --from-scratch trains).
        return 128 + getattr(error, 'signum', signal.SIGINT)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    if scoreboard.interrupted_by and not args.forever and scoreboard.matched < args.frames:
        print(f'interrupted after {scoreboard.matched} of {args.frames} captions',
              file=sys.stderr)
        return 128 + scoreboard.interrupted_by
    if scoreboard.matched == 0:
        print('error: no captions arrived', file=sys.stderr)
        return EXIT_ERROR
    if scoreboard.accuracy < args.min_accuracy:
        print(f'error: exact match {scoreboard.accuracy:.1%} is below --min-accuracy '
              f'{args.min_accuracy:.1%}', file=sys.stderr)
        return EXIT_BELOW_ACCURACY
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
