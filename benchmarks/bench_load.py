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
Benchmark 3: the caption node under load from 1, 2 and 4 cameras at 30 Hz, 640x480 rgb8.

The caption node runs in its own process (CaptionNode spun exactly as ``main()`` does, with a
MultiThreadedExecutor of 4 threads) with a small BLIP-2 built here that is slower than the
cameras, so frames pile up unless the node drops them. This process publishes the cameras
(best effort, like a camera driver) and listens to the captions and ``/diagnostics``. Each
camera count runs a node with batching (``max_batch_size`` 8) and, as the baseline, a node
that captions one frame per generate call (``max_batch_size`` 1). The two run side by side
and take turns: the cameras publish to one for a segment (10 s), then to the other, so both
see the same load from the rest of the machine; the idle one only waits.

Measured per node, after a warm-up: captions per second (captions of frames published in its
turns, over the length of its turns), latency from publishing a frame to
receiving its caption (p50, p95; both ends read the same wall clock), frames replaced (the
node's own count on /diagnostics), the node's CPU time outside inference, and its resident
memory. CPU outside inference is read per thread from /proc: the node's inference thread is
renamed before the first frame, so the OpenMP threads torch starts from it inherit the name;
everything else (executor, DDS, diagnostics) is "outside". The inference thread also converts
the messages and publishes the captions, so that small cost counts as inference here.

Goals: no backlog, resident memory flat within 5% after warm-up, and batching across cameras
giving more captions per second than one frame at a time. No backlog means p95 latency within
two inference cycles, a cycle being the time the node takes to caption the newest frame of
every camera once (one generate call when batching, one call per camera at max_batch_size 1;
its p95, from the calls' own inference_ms): a frame waits at most one cycle for its turn, then
its own call; a queue would grow past that.
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

INFERENCE_THREAD_NAME = 'blip2_infer'
CAMERA_RATE_HZ = 30.0
GOAL_MEMORY_GROWTH = 0.05
CAMERA_COUNTS = (1, 2, 4)
# Batching, and one frame per generate call as its baseline (the same with one camera).
BATCH_SIZES = (8, 1)


def serve_node(parameters_file, name):
    """Run CaptionNode as main() does, with the inference thread renamed (own process)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from blip2_ros.caption_node import (CaptionNode, INFERENCE_THREAD,
                                        keep_large_buffers_in_the_heap)

    keep_large_buffers_in_the_heap()
    rclpy.init(args=['--ros-args', '--params-file', parameters_file, '-r', f'__node:={name}'])
    node = CaptionNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        # The node configures itself in the background (autostart); its inference thread
        # appears when the model has loaded.
        worker = None
        while worker is None:
            executor.spin_once(timeout_sec=0.1)
            worker = next((thread for thread in threading.enumerate()
                           if thread.name == INFERENCE_THREAD), None)
        # No frame has arrived yet, so the worker has not started torch's thread team: the
        # team inherits this name when it starts, which lets /proc tell inference CPU time
        # apart.
        with open(f'/proc/self/task/{worker.native_id}/comm', 'w') as stream:
            stream.write(INFERENCE_THREAD_NAME)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def cpu_by_thread_kind(process):
    """Return (inference CPU seconds, other CPU seconds) of ``process``, read from /proc."""
    inference = other = 0.0
    for thread in process.threads():
        try:
            with open(f'/proc/{process.pid}/task/{thread.id}/comm') as stream:
                name = stream.read().strip()
        except OSError:
            continue  # the thread ended between the two reads
        seconds = thread.user_time + thread.system_time
        if name == INFERENCE_THREAD_NAME:
            inference += seconds
        else:
            other += seconds
    return inference, other


class Cameras:
    """Publishes 640x480 rgb8 frames at 30 Hz to one node at a time and collects its captions."""

    def __init__(self, count, labels):
        """Create camera publishers and caption/diagnostics listeners for every node label."""
        import rclpy
        from bench_preprocess import camera_like_frame
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        rclpy.init()
        self.node = rclpy.create_node('bench_cameras')
        sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                                reliability=ReliabilityPolicy.BEST_EFFORT)
        self.messages = []
        for index in range(count):
            frame = camera_like_frame(480, 640)
            frame = (frame.astype(int) + 40 * index) % 256  # a different view per camera
            message = Image(height=480, width=640, encoding='rgb8', step=640 * 3)
            message.header.frame_id = f'camera_{index}'
            message.data = array.array('B', frame.astype('uint8').tobytes())
            self.messages.append(message)
        self.topics, self.publishers = {}, {}
        self.lock = threading.Lock()
        self.captions = {label: [] for label in labels}  # (receive wall time, info)
        self.diagnostics = {label: {} for label in labels}
        self.published = dict.fromkeys(labels, 0)
        for label in labels:
            self.topics[label] = [f'/bench/{label}/camera_{index}/image_raw'
                                  for index in range(count)]
            self.publishers[label] = [self.node.create_publisher(Image, topic, sensor_qos)
                                      for topic in self.topics[label]]
            self.node.create_subscription(
                String, f'/bench/{label}/caption_info',
                lambda message, label=label: self._on_info(label, message), 100)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()
        self.active = None
        self.stop = threading.Event()
        self.publishing = threading.Thread(target=self._publish_loop, daemon=True)
        self.publishing.start()

    def _on_info(self, label, message):
        received = time.time()
        with self.lock:
            self.captions[label].append((received, json.loads(message.data)))

    def _on_diagnostics(self, message):
        for status in message.status:
            for label in self.diagnostics:
                if status.name.startswith(f'{node_name(label)}:'):
                    with self.lock:
                        self.diagnostics[label] = {value.key: value.value
                                                   for value in status.values}

    def connected(self, label):
        """Whether node ``label`` subscribes to every camera and publishes caption info."""
        return (all(publisher.get_subscription_count() > 0
                    for publisher in self.publishers[label])
                and self.node.count_publishers(f'/bench/{label}/caption_info') > 0)

    def _publish_loop(self):
        period = 1.0 / CAMERA_RATE_HZ
        next_tick = time.monotonic()
        while not self.stop.is_set():
            label = self.active
            if label is not None:
                for publisher, message in zip(self.publishers[label], self.messages):
                    now_ns = time.time_ns()
                    message.header.stamp.sec = now_ns // 1_000_000_000
                    message.header.stamp.nanosec = now_ns % 1_000_000_000
                    publisher.publish(message)
                with self.lock:
                    self.published[label] += len(self.messages)
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()  # behind: skip ticks rather than burst

    def snapshot(self, label):
        """Return (captions so far, latest diagnostics values, frames published) of a node."""
        with self.lock:
            return (list(self.captions[label]), dict(self.diagnostics[label]),
                    self.published[label])

    def close(self):
        """Stop publishing and tear down."""
        import rclpy
        self.stop.set()
        self.publishing.join(timeout=5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown()


def node_name(label):
    """Name of the caption node process labelled ``label``."""
    return f'blip2_caption_{label}'


def write_parameters(folder, checkpoint, label, topics, max_batch_size, max_new_tokens):
    """Write the parameter file of one caption node; return its path."""
    path = os.path.join(folder, f'load_{len(topics)}_{label}.yaml')
    with open(path, 'w') as stream:
        stream.write(
            '/**:\n  ros__parameters:\n'
            f'    model: {json.dumps(str(checkpoint))}\n'
            f'    image_topics: {json.dumps(topics)}\n'
            f'    caption_topic: /bench/{label}/caption\n'
            f'    caption_info_topic: /bench/{label}/caption_info\n'
            f'    max_new_tokens: {max_new_tokens}\n'
            f'    max_batch_size: {max_batch_size}\n'
            '    diagnostics_period: 0.5\n')
    return path


def wait_for(condition, timeout, what):
    """Poll ``condition`` until true; raise RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f'timed out after {timeout:g} s waiting for {what}')


def camera_count_run(folder, checkpoint, cameras_count, batch_sizes, duration, segment,
                     warmup, max_new_tokens, node_environment=None):
    """
    Measure one caption node per max_batch_size against ``cameras_count`` cameras.

    The nodes run side by side and take turns: the cameras publish to one of them for
    ``segment`` seconds, then to the next, until each has had ``duration`` seconds, so that
    every node sees the same load from the rest of the machine. An idle node only waits.
    """
    import psutil

    labels = [f'batch{size}' for size in batch_sizes]
    cameras = Cameras(cameras_count, labels)
    children, logs = {}, []
    try:
        for label, size in zip(labels, batch_sizes):
            parameters = write_parameters(folder, checkpoint, label, cameras.topics[label],
                                          size, max_new_tokens)
            log = open(os.path.join(folder, f'node_{cameras_count}_{label}.log'), 'w')
            logs.append(log)
            children[label] = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), '--serve-node', parameters,
                 node_name(label)], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=node_environment)
        for label in labels:
            try:
                wait_for(lambda label=label: cameras.connected(label), 120,
                         f'caption node {label} to subscribe')
            except RuntimeError:
                logs[labels.index(label)].flush()
                with open(logs[labels.index(label)].name) as stream:
                    raise RuntimeError(f'caption node {label} did not come up:\n'
                                       + stream.read()[-2000:])
        processes = {label: psutil.Process(child.pid) for label, child in children.items()}
        for label in labels:
            cameras.active = label
            time.sleep(warmup)
        cameras.active = None
        time.sleep(1.0)
        before = {label: (cameras.snapshot(label), cpu_by_thread_kind(processes[label]),
                          processes[label].memory_info().rss) for label in labels}
        segments = {label: [] for label in labels}  # (start, end) wall-clock seconds
        active_s = dict.fromkeys(labels, 0.0)
        turn = 0
        while min(active_s.values()) < duration - 1e-6:
            order = labels if turn % 2 == 0 else labels[::-1]
            for label in order:
                length = min(segment, duration - active_s[label])
                if length <= 0:
                    continue
                cameras.active = label
                started = time.time()
                time.sleep(length)
                segments[label].append((started, time.time()))
                active_s[label] += length
            turn += 1
        cameras.active = None
        time.sleep(2.0)  # the last captions in flight
        after = {label: (cameras.snapshot(label), cpu_by_thread_kind(processes[label]),
                         processes[label].memory_info().rss) for label in labels}
    finally:
        cameras.close()
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGINT)
        for child in children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for log in logs:
            log.close()
    return [summarize(cameras_count, size, segments[label], before[label], after[label])
            for label, size in zip(labels, batch_sizes)]


def summarize(cameras_count, max_batch_size, segments, before, after):
    """Turn one node's captions, counters and /proc readings into a result row."""
    (captions_before, diagnostics_before, published_before), cpu_before, rss_before = before
    (captions_after, diagnostics_after, published_after), cpu_after, rss_after = after
    active = sum(end - start for start, end in segments)

    def in_segments(stamp):
        return any(start <= stamp <= end for start, end in segments)

    latencies, call_ms = [], []
    counted, previous = 0, None
    for received, info in captions_after[len(captions_before):]:
        stamp = info['stamp']['sec'] + info['stamp']['nanosec'] * 1e-9
        # The captions of one call arrive together and share its inference time.
        call = (info['inference_ms'], info['batch_size'])
        if call != previous:
            call_ms.append(info['inference_ms'])
        previous = call
        if in_segments(stamp):
            counted += 1
            latencies.append((received - stamp) * 1000.0)
    latency = common.summary(latencies)
    call = common.summary(call_ms)
    # The node takes the newest frame of every camera, then captions them max_batch_size at a
    # time: a frame waits for at most one such cycle before its own turn starts. On a shared
    # CPU the call time varies a lot, so the p95 latency is held against a p95 cycle.
    calls_per_cycle = -(-cameras_count // max_batch_size)
    cycle_ms = call['p95'] * calls_per_cycle if call['p95'] else None
    published = published_after - published_before

    def counter(values, key):
        return int(values.get(key, 0))

    received = sum(counter(diagnostics_after, key) - counter(diagnostics_before, key)
                   for key in diagnostics_after if key.startswith('received '))
    replaced = (counter(diagnostics_after, 'replaced_frames')
                - counter(diagnostics_before, 'replaced_frames'))
    other_cpu = cpu_after[1] - cpu_before[1]
    return {
        'cameras': cameras_count, 'max_batch_size': max_batch_size,
        'active_s': active, 'published': published, 'received': received,
        'input_hz_per_camera': published / active / cameras_count,
        'captions': counted, 'captions_per_s': counted / active,
        'mean_batch': (len(captions_after) - len(captions_before)) / len(call_ms)
        if call_ms else None,
        'inference_ms_p50': call['p50'], 'inference_ms_p95': call['p95'],
        'cycle_p95_ms': cycle_ms,
        'latency_ms_p50': latency['p50'], 'latency_ms_p95': latency['p95'],
        'latency_in_cycles_p95': (latency['p95'] / cycle_ms
                                  if cycle_ms and latency['p95'] else None),
        'replaced': replaced,
        'inference_cpu_s': cpu_after[0] - cpu_before[0], 'outside_cpu_s': other_cpu,
        'outside_cpu_percent': 100.0 * other_cpu / active,
        'outside_cpu_ms_per_frame': 1000.0 * other_cpu / received if received else None,
        'rss_after_warmup_mb': rss_before / 2**20, 'rss_end_mb': rss_after / 2**20,
        'rss_growth_after_warmup': (rss_after - rss_before) / rss_before,
        'load_average_1min': os.getloadavg()[0],
        'latency_ms': latency,
    }


def judge(rows):
    """Return the goal verdicts for a list of run rows."""
    goals = []
    worst = max(rows, key=lambda row: row['latency_in_cycles_p95'] or float('inf'))
    goals.append(common.goal(
        'no backlog: p95 latency <= 2 inference cycles (p95) in every run',
        all(row['latency_in_cycles_p95'] is not None and row['latency_in_cycles_p95'] <= 2.0
            for row in rows),
        f"worst {worst['latency_in_cycles_p95'] or float('nan'):.2f} cycles "
        f"({worst['cameras']} cameras, batch {worst['max_batch_size']})"))
    growth = max(rows, key=lambda row: abs(row['rss_growth_after_warmup']))
    goals.append(common.goal(
        f'resident memory flat within {GOAL_MEMORY_GROWTH:.0%} after warm-up (every run)',
        all(abs(row['rss_growth_after_warmup']) <= GOAL_MEMORY_GROWTH for row in rows),
        f"largest change {growth['rss_growth_after_warmup']:+.1%} "
        f"({growth['cameras']} cameras, batch {growth['max_batch_size']})"))
    by_key = {(row['cameras'], row['max_batch_size']): row for row in rows}
    for cameras in sorted({row['cameras'] for row in rows if row['cameras'] > 1}):
        batched, single = by_key.get((cameras, 8)), by_key.get((cameras, 1))
        if batched and single:
            ratio = batched['captions_per_s'] / max(single['captions_per_s'], 1e-9)
            goals.append(common.goal(
                f'batching beats one frame at a time with {cameras} cameras',
                ratio > 1.0, f"{batched['captions_per_s']:.2f} vs "
                f"{single['captions_per_s']:.2f} captions/s ({ratio:.2f}x)"))
    return goals


COLUMNS = [('cameras', 'cameras'), ('max_batch_size', 'max batch'),
           ('input_hz_per_camera', 'input Hz/camera'), ('captions_per_s', 'captions/s'),
           ('mean_batch', 'mean batch'), ('inference_ms_p50', 'generate call ms p50'),
           ('cycle_p95_ms', 'cycle ms p95'), ('latency_ms_p50', 'latency p50 ms'),
           ('latency_ms_p95', 'latency p95 ms'), ('latency_in_cycles_p95', 'p95 in cycles'),
           ('published', 'published'), ('received', 'received'),
           ('replaced', 'replaced'),
           ('outside_cpu_percent', 'CPU outside inference %'),
           ('outside_cpu_ms_per_frame', 'outside ms/frame'),
           ('rss_after_warmup_mb', 'RSS after warm-up MB'), ('rss_end_mb', 'RSS end MB'),
           ('rss_growth_after_warmup', 'RSS change'), ('load_average_1min', 'load avg')]


def main(argv=None):
    """Run the load benchmark (or, with --serve-node, be a caption node)."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0],
                                    '6 s per node in 3 s turns after 3 s warm-up (smoke run)')
    parser.add_argument('--duration', type=float, default=None,
                        help='measured seconds per node and camera count (default 40)')
    parser.add_argument('--segment', type=float, default=None,
                        help='seconds of each turn when two nodes alternate (default 10)')
    parser.add_argument('--warmup', type=float, default=None,
                        help='seconds of frames per node before measuring (default 6)')
    parser.add_argument('--domain-id', type=int, default=None,
                        help='ROS_DOMAIN_ID for every process of the benchmark '
                        '(default: one no other demo, test or benchmark run here holds)')
    parser.add_argument('--max-new-tokens', type=int, default=20)
    parser.add_argument('--torch-threads', type=int, default=0,
                        help='OMP_NUM_THREADS for the nodes (default: torch chooses, one per '
                             'core)')
    common.add_omp_wait_policy_argument(parser)
    parser.add_argument('--serve-node', nargs=2, metavar=('PARAMS', 'NAME'),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_node:
        return serve_node(*args.serve_node)
    from blip2_ros.demo.isolation import isolate_ros
    isolate_ros(args.domain_id)
    common.quiet_libraries()
    from training.tiny_blip2 import build_tiny_blip2

    duration = args.duration or (6.0 if args.quick else 40.0)
    segment = args.segment or (3.0 if args.quick else 10.0)
    warmup = args.warmup or (3.0 if args.quick else 6.0)
    common.set_omp_wait_policy(args.omp_wait_policy)
    node_environment = dict(os.environ)
    if args.torch_threads:
        node_environment['OMP_NUM_THREADS'] = str(args.torch_threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # Slower than a 30 Hz camera on a small CPU, like a real model on a small GPU.
        checkpoint = build_tiny_blip2(os.path.join(folder, 'model'), image_size=224,
                                      patch_size=14, hidden_size=192, num_layers=4,
                                      words_only=True)
        for cameras in CAMERA_COUNTS:
            batch_sizes = BATCH_SIZES[:1] if cameras == 1 else BATCH_SIZES
            for row in camera_count_run(folder, checkpoint, cameras, batch_sizes, duration,
                                        segment, warmup, args.max_new_tokens,
                                        node_environment):
                rows.append(row)
                print(f"{cameras} camera(s), max_batch_size {row['max_batch_size']}: "
                      f"{row['captions_per_s']:.2f} captions/s, p95 latency "
                      f"{row['latency_ms_p95'] or float('nan'):.0f} ms", flush=True)
    goals = judge(rows)
    print(f'\nLoad: 640x480 rgb8 cameras at {CAMERA_RATE_HZ:g} Hz, {duration:g} s measured per '
          f'node after {warmup:g} s warm-up, nodes alternating every {segment:g} s, '
          f'max_new_tokens {args.max_new_tokens}, torch threads per node '
          f"{args.torch_threads or 'default'}, OMP_WAIT_POLICY {args.omp_wait_policy}; "
          f'load average at the end: '
          f'{os.getloadavg()[0]:.2f}')
    print(common.table(rows, COLUMNS))
    print()
    print(common.goals_table(goals))
    return common.finish({'benchmark': 'load', 'machine': common.machine_info(),
                          'load_average': os.getloadavg(), 'duration_s': duration,
                          'segment_s': segment, 'warmup_s': warmup,
                          'torch_threads': args.torch_threads or None,
                          'omp_wait_policy': args.omp_wait_policy, 'rows': rows,
                          'goals': goals}, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
