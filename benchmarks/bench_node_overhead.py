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
Benchmark 2: what the caption node adds to moving a frame, against a bare rclpy echo.

This process publishes one frame at a time and waits for the answer. Two answering processes
run side by side, each on topics of its own, and every frame size and encoding is sent to them
in turn (echo full, echo ack, node, repeat), so both see the same machine load:

* a bare rclpy echo node that either republishes the message unchanged (``echo full``: the
  frame travels twice) or answers it with a short String (``echo ack``). The caption node's
  traffic has the ack's shape, a frame in and a short string out, so the ack echo is the
  floor the node is judged against; the full echo is shown for reference;
* the caption node itself (``python -m blip2_ros.caption_node``, a tiny BLIP-2 on the CPU),
  answering on ``/blip2/caption_info``, whose ``inference_ms`` is the captioner's own time on
  that frame (preprocessing and generate). Node overhead = round trip - inference_ms, and what
  the node adds = node overhead - ack round trip, taken pair by pair.

Every process (this one, the echo, the node) serves large buffers from the heap, as the node's
``main()`` does (``keep_large_buffers_in_the_heap``): without it, glibc maps and unmaps the
pages of every 1080p message, which cost a bare echo 15 to 20 ms per frame on a loaded 2-core
machine and would make the floor, not the node, the slow part.

Frames are 640x480 and 1920x1080, raw rgb8 and JPEG. Every process uses the Fast DDS profile
config/fastdds_large_frames.xml (FASTDDS_DEFAULT_PROFILES_FILE): with Fast DDS's default
512 KB shared-memory segment, raw frames this large go as UDP fragments and best-effort
subscribers lose most of them. All traffic stays on loopback in a domain of its own.

Goal: the node adds at most 5 ms (p50) to the echo floor at 1920x1080.
"""

import argparse
import array
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import common

RAW_TOPIC = '/bench/image'
JPEG_TOPIC = '/bench/image/compressed'
ECHO_IN_RAW_TOPIC = '/bench/echo_in/image'
ECHO_IN_JPEG_TOPIC = '/bench/echo_in/image/compressed'
ECHO_RAW_TOPIC = '/bench/echo_out/image'
ECHO_JPEG_TOPIC = '/bench/echo_out/image/compressed'
ACK_TOPIC = '/bench/echo_out/ack'
# The frame_id of a frame sent to the echo says which answer it wants.
FULL, ACK = 'echo_full', 'echo_ack'
RESPONDERS = (FULL, ACK, 'node')
# The caption node exactly as a user starts it where ros2cli is absent.
NODE_COMMAND = ['-m', 'blip2_ros.caption_node']
CAPTION_INFO_TOPIC = '/blip2/caption_info'
# The tiny model takes 224 px frames, as blip2-opt-2.7b does.
MODEL_INPUT = (224, 224)
GOAL_ADDED_MS = 5.0
CONFIGS = (('640x480', 'rgb8'), ('640x480', 'jpeg'), ('1920x1080', 'rgb8'),
           ('1920x1080', 'jpeg'))


def camera_qos():
    """Return the caption node's default camera QoS: best effort, depth 1."""
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                      reliability=ReliabilityPolicy.BEST_EFFORT)


def serve_echo():
    """Run the bare echo node (in its own process) until SIGINT."""
    from blip2_ros.caption_node import keep_large_buffers_in_the_heap
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    keep_large_buffers_in_the_heap()
    rclpy.init()
    node = rclpy.create_node('bench_echo')
    ack = node.create_publisher(String, ACK_TOPIC, 10)

    def answer_with(echo):
        def answer(message):
            if message.header.frame_id == FULL:
                echo.publish(message)
                return
            stamp = message.header.stamp
            ack.publish(String(data=json.dumps({'stamp': {'sec': stamp.sec,
                                                          'nanosec': stamp.nanosec}})))
        return answer
    raw_echo = node.create_publisher(Image, ECHO_RAW_TOPIC, 10)
    jpeg_echo = node.create_publisher(CompressedImage, ECHO_JPEG_TOPIC, 10)
    node.create_subscription(Image, ECHO_IN_RAW_TOPIC, answer_with(raw_echo), camera_qos())
    node.create_subscription(CompressedImage, ECHO_IN_JPEG_TOPIC, answer_with(jpeg_echo),
                             camera_qos())
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def make_messages():
    """Build one Image and one CompressedImage per frame size, the way a camera driver would."""
    import cv2
    from bench_preprocess import camera_like_frame
    from sensor_msgs.msg import CompressedImage, Image

    messages = {}
    for size in ('640x480', '1920x1080'):
        width, height = (int(value) for value in size.split('x'))
        frame = camera_like_frame(height, width)
        raw = Image(height=height, width=width, encoding='rgb8', step=width * 3)
        raw.header.frame_id = 'bench_camera'
        # array.array is the fast way into rclpy's generated setter.
        raw.data = array.array('B', frame.tobytes())
        ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, 'JPEG encoding failed'
        jpeg = CompressedImage(format='rgb8; jpeg compressed bgr8')
        jpeg.header.frame_id = 'bench_camera'
        jpeg.data = array.array('B', encoded.tobytes())
        messages[(size, 'rgb8')] = raw
        messages[(size, 'jpeg')] = jpeg
    return messages


class Client:
    """This process's side: publishes frames and times the answers."""

    def __init__(self):
        """Create the publishers and the answer subscriptions, spin in a thread."""
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        rclpy.init()
        self.node = rclpy.create_node('bench_client')
        publisher_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.publishers = {
            ('node', 'rgb8'): self.node.create_publisher(Image, RAW_TOPIC, publisher_qos),
            ('node', 'jpeg'): self.node.create_publisher(CompressedImage, JPEG_TOPIC,
                                                         publisher_qos),
            ('echo', 'rgb8'): self.node.create_publisher(Image, ECHO_IN_RAW_TOPIC,
                                                         publisher_qos),
            ('echo', 'jpeg'): self.node.create_publisher(CompressedImage, ECHO_IN_JPEG_TOPIC,
                                                         publisher_qos),
        }
        self.answers = {}
        self.answered = threading.Condition()
        self.node.create_subscription(Image, ECHO_RAW_TOPIC, self._on_image, 10)
        self.node.create_subscription(CompressedImage, ECHO_JPEG_TOPIC, self._on_image, 10)
        self.node.create_subscription(String, ACK_TOPIC, self._on_json, 10)
        self.node.create_subscription(String, CAPTION_INFO_TOPIC, self._on_json, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()

    def _record(self, sequence, payload):
        arrived = time.monotonic()
        with self.answered:
            self.answers[sequence] = (arrived, payload)
            self.answered.notify_all()

    def _on_image(self, message):
        self._record(message.header.stamp.sec, None)

    def _on_json(self, message):
        payload = json.loads(message.data)
        self._record(payload['stamp']['sec'], payload)

    def wait_until_connected(self, timeout=60.0):
        """Wait until every camera topic has its subscriber and every answer its publisher."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (all(publisher.get_subscription_count() > 0
                    for publisher in self.publishers.values())
                    and self.node.count_publishers(ACK_TOPIC) > 0
                    and self.node.count_publishers(CAPTION_INFO_TOPIC) > 0):
                return True
            time.sleep(0.05)
        return False

    def round_trip(self, responder, encoding, message, sequence, timeout=10.0):
        """Send ``message`` to ``responder``; return (seconds, answer payload) or None."""
        message.header.stamp.sec = sequence
        message.header.stamp.nanosec = 0
        message.header.frame_id = responder
        target = 'node' if responder == 'node' else 'echo'
        started = time.monotonic()
        self.publishers[(target, encoding)].publish(message)
        with self.answered:
            if not self.answered.wait_for(lambda: sequence in self.answers, timeout):
                return None
            arrived, payload = self.answers.pop(sequence)
        return arrived - started, payload

    def close(self):
        """Stop spinning and shut rclpy down."""
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown()


def start_process(arguments, log_path):
    """Start a child process in its own process group, its output going to ``log_path``."""
    log = open(log_path, 'w')
    return subprocess.Popen([sys.executable] + arguments, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def stop_process(process, log):
    """Interrupt a child we started (SIGINT, as Ctrl-C would), then kill it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log.close()


def measure(client, messages, frames, warmup, pause):
    """Time ``frames`` round trips per config and responder, the responders taking turns."""
    if not client.wait_until_connected():
        raise RuntimeError('the echo or the caption node did not connect within 60 s')
    results = {config: {name: {'round_trip_ms': [], 'inference_ms': [], 'lost': 0}
                        for name in RESPONDERS} for config in CONFIGS}
    sequence = 1
    for config in CONFIGS:
        message = messages[config]
        for index in range(warmup + frames):
            answers = {}
            # A different responder goes first each turn, so none gains from its place.
            shift = index % len(RESPONDERS)
            for name in RESPONDERS[shift:] + RESPONDERS[:shift]:
                answers[name] = client.round_trip(name, config[1], message, sequence)
                sequence += 1
                time.sleep(pause)
            if index < warmup:
                continue
            if any(answer is None for answer in answers.values()):
                # Keep the samples paired: a turn with a lost frame is dropped whole.
                for name, answer in answers.items():
                    results[config][name]['lost'] += answer is None
                continue
            for name, (seconds, payload) in answers.items():
                results[config][name]['round_trip_ms'].append(seconds * 1000.0)
                if payload and 'inference_ms' in payload:
                    results[config][name]['inference_ms'].append(payload['inference_ms'])
    return results


def conversion_times(messages, min_size, repeats=20):
    """
    Time message_to_rgb on each message (in this process): as the node calls it, and at full size.

    The node passes the model's input size, so large JPEGs decode at a reduced scale; the full
    decode is the baseline for that.
    """
    from blip2_ros.image_conversion import message_to_rgb
    times = {}
    for config, message in messages.items():
        node_ms, full_ms = (common.summary(common.time_calls(
            lambda size=size, message=message: message_to_rgb(message, min_size=size),
            repeats))['p50'] for size in (min_size, None))
        times[config] = {'node': node_ms, 'full': full_ms}
    return times


def write_node_parameters(folder, checkpoint, backend='local'):
    """Write the caption node's parameter file for this benchmark; return its path."""
    path = os.path.join(folder, 'caption_node_bench.yaml')
    with open(path, 'w') as stream:
        stream.write(
            '/**:\n  ros__parameters:\n'
            f'    model: {json.dumps(str(checkpoint))}\n'
            f'    backend: {backend}\n'
            f'    image_topics: {json.dumps([RAW_TOPIC, JPEG_TOPIC])}\n'
            '    max_new_tokens: 8\n'
            '    diagnostics_period: 1.0\n')
    return path


def run(frames, warmup, pause, log_folder, backend='local'):
    """Start the echo and the caption node, measure, stop them; return the raw results."""
    from training.tiny_blip2 import build_tiny_blip2

    # words_only: every caption has max_new_tokens words; the node publishes no empty one.
    checkpoint = build_tiny_blip2(os.path.join(log_folder, 'tiny'), image_size=MODEL_INPUT[0],
                                  patch_size=14, words_only=True)
    parameters = write_node_parameters(log_folder, checkpoint, backend)
    messages = make_messages()
    children = {
        'echo': [os.path.abspath(__file__), '--serve-echo'],
        'node': NODE_COMMAND + ['--ros-args', '--params-file', parameters],
    }
    started = {name: start_process(arguments, os.path.join(log_folder, f'{name}.log'))
               for name, arguments in children.items()}
    client = Client()
    try:
        results = measure(client, messages, frames, warmup, pause)
        conversion = conversion_times(messages, MODEL_INPUT)
        for config in CONFIGS:
            results[config]['conversion_ms'] = conversion[config]['node']
            results[config]['full_conversion_ms'] = conversion[config]['full']
        return results
    except RuntimeError as error:
        logs = []
        for name in children:
            with open(os.path.join(log_folder, f'{name}.log')) as stream:
                logs.append(f'--- {name} log:\n' + stream.read()[-1500:])
        raise RuntimeError(f'{error}\n' + '\n'.join(logs)) from error
    finally:
        client.close()
        for process, log in started.values():
            stop_process(process, log)


def analyse(raw):
    """Turn raw round trips into one row per config and the goal verdicts."""
    rows, goals = [], []
    for config in CONFIGS:
        by_name = raw[config]
        full_ms = by_name[FULL]['round_trip_ms']
        ack_ms = by_name[ACK]['round_trip_ms']
        node_ms = by_name['node']['round_trip_ms']
        inference_ms = by_name['node']['inference_ms']
        outside_ms = [total - model for total, model in zip(node_ms, inference_ms)]
        added_vs_ack = common.summary([outside - ack for outside, ack in zip(outside_ms, ack_ms)])
        added_vs_full = common.summary([outside - full
                                        for outside, full in zip(outside_ms, full_ms)])
        full, ack = common.summary(full_ms), common.summary(ack_ms)
        node, inference = common.summary(node_ms), common.summary(inference_ms)
        outside = common.summary(outside_ms)
        rows.append({
            'frame': config[0], 'encoding': config[1],
            'echo_full_p50': full['p50'], 'echo_ack_p50': ack['p50'],
            'node_round_trip_p50': node['p50'], 'inference_p50': inference['p50'],
            'node_outside_inference_p50': outside['p50'],
            'added_vs_ack_p50': added_vs_ack['p50'], 'added_vs_ack_p95': added_vs_ack['p95'],
            'added_vs_full_p50': added_vs_full['p50'], 'samples': outside['n'],
            'conversion_ms_p50': by_name['conversion_ms'],
            'full_conversion_ms_p50': by_name['full_conversion_ms'],
            'lost': {name: by_name[name]['lost'] for name in RESPONDERS},
            'echo_full_ms': full, 'echo_ack_ms': ack, 'node_round_trip_ms': node,
            'inference_ms': inference, 'node_outside_inference_ms': outside,
            'added_vs_ack_ms': added_vs_ack, 'added_vs_full_ms': added_vs_full,
        })
        if config[0] == '1920x1080':
            added = added_vs_ack['p50']
            goals.append(common.goal(
                f'node adds <= {GOAL_ADDED_MS:g} ms p50 over the echo at 1920x1080 {config[1]}',
                added is not None and added <= GOAL_ADDED_MS,
                'no samples' if added is None else
                f'{added:+.2f} ms over the ack echo ({added_vs_full["p50"]:+.2f} ms over the '
                f"full echo); converting the message takes {by_name['conversion_ms']:.2f} ms "
                f"of it ({by_name['full_conversion_ms']:.2f} ms at full size)"))
    return rows, goals


COLUMNS = [('frame', 'frame'), ('encoding', 'encoding'),
           ('echo_full_p50', 'echo full ms'), ('echo_ack_p50', 'echo ack ms'),
           ('node_round_trip_p50', 'node round trip ms'), ('inference_p50', 'inference ms'),
           ('node_outside_inference_p50', 'node minus inference ms'),
           ('added_vs_ack_p50', 'added vs ack ms (p50)'),
           ('added_vs_ack_p95', 'added vs ack ms (p95)'),
           ('added_vs_full_p50', 'added vs full ms (p50)'),
           ('conversion_ms_p50', 'of which conversion ms'),
           ('full_conversion_ms_p50', 'conversion at full size ms'),
           ('samples', 'n')]


def main(argv=None):
    """Run the benchmark (or, with --serve-echo, be the echo node)."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0],
                                    '8 frames per config instead of 60 (smoke run)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID for every process of the benchmark '
                        '(default: one no other demo, test or benchmark run here holds)')
    parser.add_argument('--frames', type=int, default=None, help='timed frames per config')
    parser.add_argument('--backend', choices=['local', 'openvino'], default='local',
                        help="the caption node's backend (openvino: the converted graphs; the "
                             'first start converts the tiny model)')
    parser.add_argument('--serve-echo', action='store_true', help=argparse.SUPPRESS)
    common.add_omp_wait_policy_argument(parser)
    args = parser.parse_args(argv)
    if args.serve_echo:
        return serve_echo()
    from blip2_ros.demo.isolation import isolate_ros
    isolate_ros(args.domain_id)
    common.set_omp_wait_policy(args.omp_wait_policy)
    common.quiet_libraries()
    from blip2_ros.caption_node import keep_large_buffers_in_the_heap
    keep_large_buffers_in_the_heap()
    frames = args.frames or (8 if args.quick else 60)
    warmup = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as folder:
        raw = run(frames, warmup, pause=0.03, log_folder=folder, backend=args.backend)
    rows, goals = analyse(raw)
    print(f'Round trip publish -> answer in ms, p50 over {frames} turns per row (p95 where '
          'said), one frame in flight at a time; every process uses '
          f'config/fastdds_large_frames.xml; node backend {args.backend}, OMP_WAIT_POLICY '
          f'{args.omp_wait_policy}; '
          'load average at the end: '
          f'{os.getloadavg()[0]:.2f}')
    print(common.table(rows, COLUMNS))
    print()
    print(common.goals_table(goals))
    return common.finish({'benchmark': 'node_overhead', 'backend': args.backend,
                          'machine': common.machine_info(),
                          'load_average': os.getloadavg(), 'frames': frames, 'rows': rows,
                          'goals': goals,
                          'raw': {f'{size} {encoding}': value
                                  for (size, encoding), value in raw.items()}},
                         args.json)


if __name__ == '__main__':
    raise SystemExit(main())
