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
ROS 2 managed node: camera topics in, BLIP-2 captions out on ``/blip2/caption``.

A lifecycle node: ``configure`` loads the model and warms it up, ``activate`` subscribes to the
cameras and starts captioning, ``deactivate`` stops it with the model kept, ``cleanup`` releases
the model. With ``autostart`` (the default) the node takes those steps itself, in the
background, so it answers services and publishes diagnostics while the model loads.

The subscription callbacks only keep the newest message per camera. A worker thread loads the
model, then converts and captions whatever is pending, all cameras in one batch, so the executor
stays free for services, parameter changes and diagnostics while the GPU is busy, and no queue
builds up when the cameras are faster than the model. The same thread does all inference: the
warm-up, the ``caption_now`` service's captions, and the warm-up of a swapped-in adapter.
"""

from collections import deque
import ctypes
import ctypes.util
import gc
import json
import os
import sys
import threading
import time
import traceback

from blip2_ros.captioner import (adapter_training_prompt, caption_results, CaptionerConfig,
                                 DEFAULT_MODEL, make_captioner, ModelLoadError,
                                 prompt_problem, TRAINING_INFO_FILE, training_prompt)
from blip2_ros.image_conversion import (format_label_mismatches, ImageConversionError,
                                        message_to_rgb)
from blip2_ros.parameters import declare, markdown_table, ParameterSpec
import cv2
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from rcl_interfaces.msg import SetParametersResult
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import (InvalidParameterTypeException, InvalidTopicNameException,
                              ParameterException, ParameterUninitializedException)
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.expand_topic_name import expand_topic_name
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.lifecycle import LifecycleNodeMixin, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, qos_policy_name_from_kind, QoSProfile,
                       ReliabilityPolicy)
from rclpy.task import Future
from rclpy.validate_full_topic_name import validate_full_topic_name
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger
import torch

NODE_NAME = 'blip2_caption'
# The thread that loads the model and runs every model call (see CaptionNode._configure).
INFERENCE_THREAD = 'blip2_inference'
# The thread that loads a new adapter at run time, beside the weights in use.
ADAPTER_LOADER_THREAD = 'blip2_adapter_loader'
# The thread that configures and activates the node when autostart is true.
AUTOSTART_THREAD = 'blip2_autostart'
# A file every LoRA folder that save_pretrained writes holds.
ADAPTER_CONFIG_FILE = 'adapter_config.json'


# The single list of parameters: the node declares these, config/caption_node.yaml holds the same
# defaults (a test checks), and the README's table is generated from it.
PARAMETERS = (
    ParameterSpec('autostart', True, 'Configure and activate at start-up, without a lifecycle '
                  'manager: the node loads the model in the background and captions once it is '
                  'ready. false: wait in the unconfigured state, with no model loaded, for a '
                  'configure transition.'),
    ParameterSpec('backend', 'local', 'local: run BLIP-2 in this process with transformers. '
                  'openvino: in this process with OpenVINO (CPU-only robots; converted once, '
                  'then cached). openai: send the frames to an OpenAI-compatible server (vLLM, '
                  'see scripts/serve_vllm.py) at server_url; frames then leave this machine.'),
    ParameterSpec('model', DEFAULT_MODEL,
                  'Hugging Face hub id or local folder of a BLIP-2 checkpoint; with backend '
                  'openai, the name the server serves it under.'),
    ParameterSpec('server_url', 'http://127.0.0.1:8000/v1', 'backend openai: base URL of the '
                  'server.'),
    ParameterSpec('api_key_env', '', 'backend openai: name of the environment variable that '
                  'holds the API key (never the key itself); empty when the server needs none.'),
    ParameterSpec('request_timeout', 10.0, 'backend openai: seconds a request may take; a frame '
                  'whose request takes longer is dropped and counted.',
                  float_range=(0.1, 600.0)),
    ParameterSpec('server_image_size', 224, "backend openai: the served model's image size "
                  '(224 for every published BLIP-2); frames are resized to it before sending.',
                  integer_range=(16, 4096)),
    ParameterSpec('adapter', '', 'Folder of a LoRA adapter from the training package; '
                  'empty for none. Merged into the model when it loads. A change at run time '
                  'loads the base model with the new adapter beside the old weights, which go '
                  'on captioning until it is ready (memory for two models meanwhile); a folder '
                  'that fails to load is logged and leaves the old one in place. '
                  'Not with backend openai (serve a merged model instead).', read_only=False),
    ParameterSpec('device', 'auto', 'auto, cpu, cuda or cuda:N. auto takes the GPU if torch '
                  'sees one.'),
    ParameterSpec('dtype', 'auto', 'auto, float32, float16 or bfloat16. auto: bfloat16 on GPUs '
                  'that support it, float32 on CPU; float16 is refused for Flan-T5.'),
    ParameterSpec('quantization', 'none', 'Weight-only quantization, backend local: none, int8 '
                  '(torchao; CPU and GPU: blip2-opt-2.7b in 3.7 GiB instead of 7.0) or int4 '
                  '(bitsandbytes NF4, GPU only: 2.3 GiB). Captions may change a little; see '
                  'docs/benchmarks.md section 8.'),
    ParameterSpec('openvino_weights', 'fp32', 'backend openvino: fp32 (captions equal the local '
                  "backend's) or int8 (nncf weight compression: faster, captions may change)."),
    ParameterSpec('local_files_only', False, 'Load the model from the local Hugging Face cache '
                  'or folder only, never from the network (offline robots).'),
    ParameterSpec('allow_pickle', False, 'Allow pickle (.bin) weights. Off: safetensors only.'),
    ParameterSpec('trust_remote_code', False, "Run the code a checkpoint's config.json names "
                  '(auto_map); its model class must build on Blip2ForConditionalGeneration. '
                  'Off: such a checkpoint is refused. Only for checkpoints you trust.'),
    ParameterSpec('image_topics', ['/camera/image_raw'], 'Camera topics. A topic ending in '
                  '/compressed is subscribed as sensor_msgs/CompressedImage, any other as '
                  'sensor_msgs/Image.'),
    ParameterSpec('reliability', 'best_effort', 'QoS reliability of the camera subscriptions: '
                  'best_effort (hears both kinds of publisher) or reliable.'),
    ParameterSpec('caption_topic', '/blip2/caption', 'Where plain captions go (std_msgs/String).'),
    ParameterSpec('caption_info_topic', '/blip2/caption_info', 'Where each caption goes again '
                  'as JSON (std_msgs/String) with source topic, stamp, frame_id, prompt, model '
                  'and latency.'),
    ParameterSpec('prompt', '', "Text the caption continues, e.g. 'a photo of' or 'Question: "
                  "is the conveyor empty? Answer:'. Empty for plain captions (or the training "
                  'prompt, see use_training_prompt).', read_only=False),
    ParameterSpec('use_training_prompt', True, 'When prompt is empty and the adapter or model '
                  f'folder holds {TRAINING_INFO_FILE} (written by training.train), caption '
                  'with the prompt the model was trained with.'),
    ParameterSpec('max_new_tokens', 30, 'Longest caption, in tokens.', read_only=False,
                  integer_range=(1, 512)),
    ParameterSpec('max_rate_hz', 0.0, 'Most captioning rounds per second (a round captions '
                  'the newest frame of every camera, in batches of at most max_batch_size); 0 '
                  'captions as fast as the model goes.', read_only=False,
                  float_range=(0.0, 1000.0)),
    ParameterSpec('max_batch_size', 8, 'Most frames captioned in one batch (one per '
                  'camera at most).', integer_range=(1, 64)),
    ParameterSpec('max_pixels', 3840 * 2160, 'Frames with more pixels than this are rejected '
                  'before decoding.', integer_range=(1, 1 << 30)),
    ParameterSpec('cache', 'dynamic', "KV cache of the decoder: dynamic (transformers' "
                  'generate), or static: fixed shapes, and greedy captions come from a decode '
                  'loop that keeps the tokens on the device. Same captions either way. Static '
                  'pays off with torch_compile; on its own it is slower on a GPU (blip2-opt-2.7b '
                  'on an H200: 592 against 372 ms per caption).'),
    ParameterSpec('torch_compile', False, 'Compile what comes before the first caption token '
                  "(image encoder, prompt) and the decoder's per-token step: CUDA graphs on a "
                  'GPU, C++ code on a CPU (needs a C++ compiler). Implies the static cache. The '
                  'node compiles at start-up, before it subscribes: minutes for blip2-opt-2.7b '
                  'on a GPU, and again for a second camera (batch size 2). Compiled code is '
                  'kept in ~/.cache/blip2_ros/torch_compile (or $TORCHINDUCTOR_CACHE_DIR), '
                  'and later starts reuse it. If compiling fails it logs why and decodes '
                  'uncompiled.'),
    ParameterSpec('torch_threads', 0, "CPU threads torch may use; 0 keeps torch's default. On "
                  'a busy CPU-only machine 1 is often much faster (see docs/benchmarks.md).',
                  integer_range=(0, 256)),
    ParameterSpec('diagnostics_period', 1.0, 'Seconds between /diagnostics messages.',
                  float_range=(0.1, 60.0)),
    ParameterSpec('stale_input_timeout', 5.0, 'Seconds without frames on a camera before '
                  'diagnostics warn about it.', float_range=(0.1, 3600.0)),
)

LATENCY_WINDOW = 200
# Frames dropped for what the model gave, each said in diagnostics with what to try.
MODEL_OUTPUT_PROBLEMS = (
    ('non_finite_scores', 'captions with NaN or inf scores',
     'try dtype float32 or bfloat16, or another model or adapter'),
    ('empty_caption', 'empty captions',
     'try the prompt the model was trained with, dtype float32, or another model or adapter'),
)

# How long a caption_now call waits for the inference thread, which may be busy with a batch
# (seconds on a CPU) before it gets to the request.
CAPTION_NOW_TIMEOUT = 60.0

# What rcl raises, e.g. for a transition that the current state does not have.
RCLError = rclpy_implementation.RCLError

WORKER_STOPPED = 'the inference thread has stopped: restart the node (its log says why)'


def parameters_markdown():
    """Return the README's parameter table, generated from PARAMETERS."""
    return markdown_table(PARAMETERS)


def _first_line(error):
    """Return an exception as one line of text, for a log line or a service answer."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def quiet_opencv():
    """Keep OpenCV's warnings about each broken frame off stderr; the node logs them, throttled."""
    # Process-wide, but this node is what decodes frames here. The function moved between
    # OpenCV releases (cv2.setLogLevel, cv2.utils.logging.setLogLevel); 2 is LOG_LEVEL_ERROR.
    logging = getattr(getattr(cv2, 'utils', None), 'logging', None)
    set_level = getattr(logging, 'setLogLevel', None) or getattr(cv2, 'setLogLevel', None)
    if set_level is not None:
        set_level(2)


def topic_name_problem(topic, node_name, namespace):
    """Return why ``topic`` is not a topic name ROS accepts for this node, or None if it is."""
    try:
        validate_full_topic_name(expand_topic_name(topic, node_name, namespace))
    except (ValueError, InvalidTopicNameException) as error:
        # rcl words it "topic name 'x' is invalid: why, at file.c:73", rclpy "Invalid topic
        # name: why:" and a second line pointing at the character; keep the why.
        why = str(error).splitlines()[0].split(', at ')[0].rstrip(':')
        for prefix in (f"topic name '{topic}' is invalid: ", 'Invalid topic name: '):
            why = why.removeprefix(prefix)
        return why
    return None


class RateMeter:
    """Events per second over the last few seconds."""

    def __init__(self, window=5.0):
        """Count events over ``window`` seconds."""
        self.window = window
        self.times = deque()

    def tick(self, now, count=1):
        """Record ``count`` events at ``now``."""
        self.times.extend([now] * count)

    def rate(self, now):
        """Events per second over the window ending at ``now``."""
        while self.times and self.times[0] < now - self.window:
            self.times.popleft()
        return len(self.times) / self.window


class Camera:
    """What the node knows of one image topic."""

    def __init__(self, topic):
        """Start with nothing received."""
        self.topic = topic
        self.latest_message = None
        self.latest_receive_time = None
        self.pending = False
        # Every frame received is, in the end, replaced by a newer one before its turn,
        # rejected, captioned or dropped (no caption); the newest may still be pending.
        self.received = 0
        self.replaced = 0
        self.captioned = 0
        self.rejected = {}  # by reason
        self.dropped = {}  # frames that got no caption, by reason
        self.input_rate = RateMeter()
        self.rejection = None  # the ImageConversionError of its newest frame, if it had one
        self.incompatible_qos = None  # the QoS policy of the last publisher that cannot connect


class NoCaptionError(RuntimeError):
    """No frame of a batch got a caption; the message says why (already counted and logged)."""


class CaptionRequest:
    """A caption_now call waiting for the inference thread to caption one frame."""

    def __init__(self, item):
        """Hold ``item``, (topic, message, receive_time); unanswered, it says: thread stopped."""
        self.item = item
        self.done = threading.Event()
        self.success = False
        self.message = WORKER_STOPPED


def percentile(values, q):
    """Return the q-th percentile of ``values`` (0 when empty)."""
    return float(np.percentile(values, q)) if values else 0.0


def _stamp_dict(header):
    return {'sec': int(header.stamp.sec), 'nanosec': int(header.stamp.nanosec)}


def _weights_name(adapter, trained_prompt=None):
    """Name the weights a node captions with, and the adapter's training prompt, for a log line."""
    if not adapter:
        return 'the base model (no adapter)'
    return f"adapter '{adapter}'" + _trained_with(trained_prompt)


def _trained_with(prompt):
    """Say which prompt an adapter was trained with ('' when its folder does not say)."""
    return '' if prompt is None else f' (trained with prompt {prompt!r})'


def _qos_fix(policy):
    """Say how to connect a camera whose QoS ``policy`` is incompatible with the node's."""
    if policy == 'RELIABILITY':
        return ("set the node's reliability parameter to best_effort, which hears both kinds "
                'of publisher')
    return "make the camera's QoS offer what the node asks for"


def same_base_model(recorded, loaded):
    """Tell whether an adapter's recorded base model names the loaded one."""
    if recorded == loaded:
        return True
    if os.path.isdir(recorded) and os.path.isdir(loaded):
        return os.path.samefile(recorded, loaded)
    # A hub id on the workstation, its downloaded folder on the robot (or the other way round):
    # the same model goes by the same last name.
    return (os.path.basename(recorded.rstrip('/\\')) == os.path.basename(loaded.rstrip('/\\')))


class AdapterSwap:
    """A captioner with a new adapter, loaded beside the old one, for the inference thread."""

    def __init__(self, adapter, captioner, generation, trained_prompt):
        """Hold what the inference thread swaps in; ``done`` is set once it has."""
        self.adapter = adapter
        self.captioner = captioner
        self.generation = generation
        self.trained_prompt = trained_prompt
        self.done = threading.Event()


class CaptionNode(LifecycleNodeMixin, Node):
    """Subscribe to cameras, caption the newest frames with BLIP-2, publish the captions."""

    def __init__(self, **kwargs):
        """
        Check the parameters (ModelLoadError on a bad one) and offer services and diagnostics.

        The model is loaded by the configure transition; with autostart, a background thread
        configures and activates the node, and ``finished`` holds 1 if that fails.
        """
        Node.__init__(self, NODE_NAME, **kwargs)
        # Transitions run inside the change_state service's callback. In the node's default,
        # mutually exclusive group, get_state, parameters and diagnostics would wait minutes for
        # a model to load; in a reentrant one they answer. _transition keeps two transitions
        # from overlapping.
        LifecycleNodeMixin.__init__(self, callback_group=ReentrantCallbackGroup())
        self._refuse_impossible_transitions()
        quiet_opencv()
        self._declare_parameters()
        self.model_name = self.get_parameter('model').value
        self.backend = self.get_parameter('backend').value
        self._choose_prompt()
        torch_threads = self.get_parameter('torch_threads').value
        if torch_threads:
            torch.set_num_threads(torch_threads)

        self._lock = threading.Lock()  # guards cameras, requests, counters and the captioner
        self._work_ready = threading.Condition(self._lock)
        self._transition_lock = threading.Lock()
        self._stopping = False  # the node is being destroyed
        self.finished = Future()  # main() returns its result: 0 finalized, 1 autostart failed
        self.captioner = None
        self.loaded_adapter = ''
        self.adapter_prompt = None  # the loaded adapter's training prompt, if its folder says
        self.phase = 'no model loaded'  # what diagnostics say besides the lifecycle state
        self.configure_error = None
        self.adapter_problem = None
        self._autostarting = False
        self._worker = None
        self._worker_stop = threading.Event()
        self._model_loaded = threading.Event()
        self._generation = 0  # counts configures: a swap loaded for an older model is dropped
        self._wanted_adapter = None
        self._adapter_loader = None
        self._pending_swap = None
        self._requests = deque()  # caption_now calls waiting for the inference thread
        self.active = False
        self.enabled = True
        self.cameras = {topic: Camera(topic) for topic in self.image_topics}
        self._camera_subscriptions = []
        self.caption_publisher = self.caption_info_publisher = None
        self.listening_since = time.monotonic()
        self._reset_counters()
        self.max_pixels = self.get_parameter('max_pixels').value
        self.max_batch_size = self.get_parameter('max_batch_size').value
        self.decode_min_size = None
        self._cuda_baseline = 0

        # Diagnostics go out in every state (they say which), so theirs is a plain publisher.
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self.create_service(SetBool, '~/enable', self._on_enable,
                            callback_group=ReentrantCallbackGroup())
        # caption_now waits for the inference thread; one at a time, so that waiting calls
        # never take every executor thread from services, parameters and diagnostics.
        self.create_service(Trigger, '~/caption_now', self._on_caption_now,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(self.get_parameter('diagnostics_period').value,
                          self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)
        if self.get_parameter('autostart').value:
            threading.Thread(target=self._autostart, name=AUTOSTART_THREAD, daemon=True).start()

    def _refuse_impossible_transitions(self):
        """Answer success: false to a transition the current state has not, on every distro."""
        # Jazzy's rclpy lets rcl's error out of the change_state callback, which ends the
        # executor's spin: one wrong request from a lifecycle manager would stop the node.
        change_state = self._service_change_state.callback

        def guarded(request, response):
            try:
                return change_state(request, response)
            except RCLError as error:
                transition = request.transition.label or request.transition.id
                self.get_logger().error(
                    f"transition '{transition}' is not possible from {self.lifecycle_state}: "
                    f'{str(error).split(", at ")[0]}')
                response.success = False
                return response
        self._service_change_state.callback = guarded

    def _reset_counters(self):
        self._last_batch_start = None
        self.rejected = {}
        self._rejected_at_last_report = 0
        self._dropped_at_last_report = 0
        self._model_output_at_last_report = {}  # dropped frames per reason, at that time
        self._label_notes_logged = 0
        self.oom_batches = 0
        self.oom_batch_limit = 0  # after running out of memory: the lowered batch size
        self.failed_batches = 0
        self.dropped = {}  # frames that got no caption, by reason
        self.captions_published = 0
        self.caption_rate = RateMeter()
        self.inference_ms = deque(maxlen=LATENCY_WINDOW)
        self.end_to_end_ms = deque(maxlen=LATENCY_WINDOW)

    @property
    def lifecycle_state(self):
        """Return the label of the current lifecycle state: 'unconfigured', 'active', ..."""
        return self._state_machine.current_state[1]

    @property
    def _shutting_down(self):
        """Whether the node is being destroyed or its context shut down (Ctrl-C)."""
        return self._stopping or not self.context.ok()

    def _autostart(self):
        """Configure and activate without a lifecycle manager; a failure ends main() with 1."""
        self._autostarting = True
        try:
            for name, trigger in (('configure', self.trigger_configure),
                                  ('activate', self.trigger_activate)):
                try:
                    result = trigger()
                except RCLError:
                    # A stop signal while the model loaded: rclpy cannot announce the
                    # transition's end on a context that is shut down.
                    if self._shutting_down:
                        return
                    raise
                if result == TransitionCallbackReturn.SUCCESS:
                    continue
                if self._shutting_down:
                    return  # stopped while it loaded: not a failure
                problem = self.configure_error or f'{name} failed'
                self.get_logger().fatal(problem)
                if not self.finished.done():
                    self.finished.set_result(1)
                return
        finally:
            self._autostarting = False

    # Lifecycle transitions -----------------------------------------------------------------

    def on_configure(self, state):
        """Load the model and warm it up; create the caption publishers."""
        return self._transition('configure', self._configure)

    def on_activate(self, state):
        """Subscribe to the cameras and start captioning."""
        return self._transition('activate', lambda: self._activate(state))

    def on_deactivate(self, state):
        """Stop captioning and unsubscribe; the model stays loaded."""
        return self._transition('deactivate', lambda: self._deactivate(state))

    def on_cleanup(self, state):
        """Release the model and its memory, and the caption publishers."""
        return self._transition('cleanup', lambda: self._cleanup(state))

    def on_shutdown(self, state):
        """Release everything; main() returns once the node is finalized."""
        def shut_down():
            self._release_all(state)
            if not self.finished.done():
                self.finished.set_result(0)
            return TransitionCallbackReturn.SUCCESS
        return self._transition('shutdown', shut_down)

    def on_error(self, state):
        """Release everything after a transition raised; the node goes back to unconfigured."""
        return self._transition('error processing', lambda: self._release_all(state))

    def _transition(self, name, work):
        """Run one transition, one at a time; log what fails, since rclpy swallows it."""
        if not self._transition_lock.acquire(blocking=False):
            self.get_logger().error(f'{name} refused: another transition is under way')
            return TransitionCallbackReturn.FAILURE
        try:
            result = work()
            self.get_logger().info(f'{name}: done, now {self._goal_state(name, result)}')
            return result
        except ModelLoadError as error:
            # A model or setting the user has to fix: one line, back to unconfigured.
            self.configure_error = str(error)
            if not self._autostarting:  # autostart says it once, as FATAL
                self.get_logger().error(f'{name} failed: {error}')
            return TransitionCallbackReturn.FAILURE
        except Exception as error:  # noqa: B902 - a bug; rclpy would drop it without a word
            self.configure_error = f'{name} failed: {_first_line(error)}'
            self.get_logger().error(f'{name} failed: {error!r}\n{traceback.format_exc()}')
            return TransitionCallbackReturn.ERROR
        finally:
            self._transition_lock.release()

    @staticmethod
    def _goal_state(name, result):
        if result != TransitionCallbackReturn.SUCCESS:
            return 'back where it was'
        return {'configure': 'inactive', 'activate': 'active', 'deactivate': 'inactive',
                'cleanup': 'unconfigured', 'shutdown': 'finalized',
                'error processing': 'unconfigured'}[name]

    def _configure(self):
        self.configure_error = None
        self.adapter_problem = None
        config = self._captioner_config(self.get_parameter('adapter').value, self._prompt())
        device = self.get_parameter('device').value
        if self.backend == 'local' and device.startswith(('auto', 'cuda')) and \
                torch.cuda.is_available():
            # Cleanup compares with it; a device that does not exist fails the load anyway.
            try:
                self._cuda_baseline = torch.cuda.memory_allocated(
                    'cuda' if device == 'auto' else device)
            except (RuntimeError, ValueError, AssertionError):
                self._cuda_baseline = 0
        with self._lock:
            self._generation += 1
            self._reset_counters()
            self._worker_stop = stop = threading.Event()
            self._model_loaded = loaded = threading.Event()
            self.phase = f"loading '{self.model_name}'"
        # Loading and warming up run on the inference thread, which captions afterwards:
        # torch keeps CUDA graphs per thread. The transition waits for it in short steps, so
        # that a node being destroyed (Ctrl-C) does not wait for a compile to end.
        self._worker = threading.Thread(target=self._run_worker, args=(config, stop, loaded),
                                        name=INFERENCE_THREAD, daemon=True)
        self._worker.start()
        while not loaded.wait(timeout=0.1):
            if self._shutting_down:
                stop.set()
                return TransitionCallbackReturn.FAILURE
        if self.captioner is None:
            self._release_model()  # ends the thread
            raise ModelLoadError(self._load_error)
        self.caption_publisher = self.create_lifecycle_publisher(
            String, self.get_parameter('caption_topic').value, 10)
        self.caption_info_publisher = self.create_lifecycle_publisher(
            String, self.get_parameter('caption_info_topic').value, 10)
        self.phase = 'model loaded, not captioning'
        return TransitionCallbackReturn.SUCCESS

    def _activate(self, state):
        if self._worker is None or not self._worker.is_alive():
            raise ModelLoadError(WORKER_STOPPED)
        camera_qos = self._camera_qos(self.get_parameter('reliability').value)
        subscription_group = MutuallyExclusiveCallbackGroup()
        for topic, camera in self.cameras.items():
            camera.incompatible_qos = None  # new subscriptions: DDS tells again if it still is
            message_type = CompressedImage if topic.endswith('/compressed') else Image
            # Subscribed by the name given, which ROS resolves (and remaps) once.
            self._camera_subscriptions.append(self.create_subscription(
                message_type, self.image_topics[topic],
                lambda message, topic=topic: self._on_frame(topic, message),
                camera_qos, callback_group=subscription_group,
                event_callbacks=SubscriptionEventCallbacks(
                    incompatible_qos=lambda event, topic=topic: self._on_incompatible_qos(
                        topic, event))))
            self.get_logger().info(f'listening to {topic} ({message_type.__name__})')
        with self._work_ready:
            # A camera is silent from when the node listens, not from before a long warm-up.
            self.listening_since = time.monotonic()
            self.active = True
            self.phase = 'captioning'
            self._work_ready.notify()
        return LifecycleNodeMixin.on_activate(self, state)  # enables the caption publishers

    def _on_incompatible_qos(self, topic, event):
        """Warn that a camera publisher's QoS cannot connect to this subscription, with the fix."""
        policy = qos_policy_name_from_kind(event.last_policy_kind)
        with self._lock:
            self.cameras[topic].incompatible_qos = policy
        self.get_logger().warning(
            f'a publisher on {topic} offers a QoS this node cannot receive ({policy} is '
            f'incompatible): no frames from it will arrive; {_qos_fix(policy)}')

    def _deactivate(self, state):
        with self._work_ready:
            self.active = False
            self.phase = 'model loaded, not captioning'
            for camera in self.cameras.values():
                camera.pending = False
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions = []
        # A batch still in flight publishes nothing: lifecycle publishers drop it.
        return LifecycleNodeMixin.on_deactivate(self, state)

    def _cleanup(self, state):
        self._release_model()
        for publisher in (self.caption_publisher, self.caption_info_publisher):
            if publisher is not None:
                self.destroy_lifecycle_publisher(publisher)
        self.caption_publisher = self.caption_info_publisher = None
        return LifecycleNodeMixin.on_cleanup(self, state)

    def _release_all(self, state):
        """Leave any state for unconfigured: what shutdown and error processing do."""
        if self.active:
            self._deactivate(state)
        self._cleanup(state)
        return TransitionCallbackReturn.SUCCESS

    def _release_model(self):
        """Stop the inference thread and drop the model, so that its memory goes back."""
        self._worker_stop.set()
        with self._work_ready:
            self._work_ready.notify_all()
            captioner, self.captioner = self.captioner, None
            swap, self._pending_swap = self._pending_swap, None
            self._wanted_adapter = None
            self.phase = 'no model loaded'
        worker = self._worker
        if (worker is not None and worker is not threading.current_thread()
                and self._model_loaded.is_set()):
            worker.join(timeout=30.0)  # a batch in flight finishes first
        if captioner is None:
            return
        if hasattr(captioner, 'close'):
            captioner.close()
        device = getattr(captioner, 'device', None)
        del captioner, swap
        self._free_memory(device)
        self.get_logger().info(f"released '{self.model_name}'" + self._memory_note(device))
        if isinstance(device, torch.device) and device.type == 'cuda':
            left_mib = (torch.cuda.memory_allocated(device) - self._cuda_baseline) / 2**20
            if left_mib > 16:  # a released model leaves nothing behind; a leak, its weights
                self.get_logger().warning(
                    f'{left_mib:.0f} MiB more CUDA memory allocated than before the model '
                    'loaded: something still holds tensors of it')

    @staticmethod
    def _free_memory(device):
        gc.collect()
        if isinstance(device, torch.device) and device.type == 'cuda':
            torch.cuda.empty_cache()

    @staticmethod
    def _memory_note(device):
        if not (isinstance(device, torch.device) and device.type == 'cuda'):
            return ''
        return (f'; {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB of CUDA memory '
                'still allocated in this process')

    def _captioner_config(self, adapter, prompt):
        # The captioner checks at load time that the prompt and caption length fit the model,
        # and its warm-up compiles for this caption length.
        return CaptionerConfig(
            backend=self.backend,
            server_url=self.get_parameter('server_url').value,
            api_key_env=self.get_parameter('api_key_env').value,
            request_timeout=self.get_parameter('request_timeout').value,
            server_image_size=self.get_parameter('server_image_size').value,
            max_in_flight=self.get_parameter('max_batch_size').value,
            model=self.model_name,
            adapter=adapter,
            device=self.get_parameter('device').value,
            dtype=self.get_parameter('dtype').value,
            local_files_only=self.get_parameter('local_files_only').value,
            allow_pickle=self.get_parameter('allow_pickle').value,
            trust_remote_code=self.get_parameter('trust_remote_code').value,
            max_new_tokens=self.get_parameter('max_new_tokens').value,
            prompt=prompt,
            cache=self.get_parameter('cache').value,
            torch_compile=self.get_parameter('torch_compile').value,
            quantization=self.get_parameter('quantization').value,
            openvino_weights=self.get_parameter('openvino_weights').value)

    def _log_loaded(self, captioner, adapter):
        with_adapter = (f" with adapter '{adapter}'"
                        + _trained_with(adapter_training_prompt(adapter)) if adapter else '')
        if captioner.backend != 'openai':
            self.get_logger().info(f"loaded '{self.model_name}'{with_adapter} on "
                                   f'{captioner.device} as {captioner.dtype} '
                                   f'({captioner.backend} backend)')
        else:
            self.get_logger().info(f"captioning with '{self.model_name}' on the server at "
                                   f'{captioner.server_url}: frames leave this machine')
        if captioner.backend != 'openai' and captioner.device.type == 'cpu' and \
                torch.get_num_threads() > 1 and 'OMP_WAIT_POLICY' not in os.environ:
            self.get_logger().warning(
                "OMP_WAIT_POLICY is not set, so torch's idle threads spin and slow down the "
                'node and other processes on a busy CPU: start the node with '
                'OMP_WAIT_POLICY=PASSIVE (caption.launch.py does) or set torch_threads to 1')

    def _warm_up_batch_sizes(self, captioner):
        if not captioner.compile_decode:
            return []
        # Compile now, so that the first camera frames are not the ones that wait for it.
        return list(range(1, min(len(self.cameras), self.max_batch_size) + 1))

    def _warm_up(self, captioner, prompt):
        """Compile for every batch size the cameras can make; ModelLoadError if that fails."""
        batch_sizes = self._warm_up_batch_sizes(captioner)
        if not batch_sizes:
            return
        self.get_logger().info(f'compiling the decode step for batch sizes {batch_sizes}; '
                               'this takes a while')
        started = time.monotonic()
        try:
            captioner.warm_up(batch_sizes, prompt=prompt)
        except Exception as error:  # noqa: B902 -- said in one line, as a load error
            # Compiling errors are handled in the captioner (it decodes uncompiled); what
            # reaches here is mostly a batch of every camera's frames that does not fit.
            hint = ('; lower max_batch_size, or use a smaller dtype or model'
                    if isinstance(error, torch.OutOfMemoryError) else '')
            raise ModelLoadError(f'warming up for batch sizes {batch_sizes} failed: '
                                 f'{_first_line(error)}{hint}') from None
        kept = captioner.compile_cache
        self.get_logger().info(f'compiled in {time.monotonic() - started:.0f} s'
                               + (f'; kept in {kept}, so the next start is faster'
                                  if kept else ''))

    # Parameters ----------------------------------------------------------------------------

    def _declare_parameters(self):
        """Declare the parameters and stop, in one line, on values that cannot work."""
        try:
            declare(self, PARAMETERS)
        except ParameterException as error:
            # rclpy declares them in order and stops at the first value it refuses.
            spec = next(spec for spec in PARAMETERS if not self.has_parameter(spec.name))
            # rclpy's text ends with the name again; a refused range is worded after 'Reason: '.
            detail = str(error).removesuffix(f': {spec.name}').split('Reason: ')[-1]
            if isinstance(error, InvalidParameterTypeException) and \
                    isinstance(spec.default, float):
                detail += '; write it with a decimal point, e.g. 2.0 rather than 2'
            raise ModelLoadError(f'bad value for parameter {spec.name}: {detail}') from None
        reliability = self.get_parameter('reliability').value
        if reliability not in ('best_effort', 'reliable'):
            raise ModelLoadError(
                f"reliability must be 'best_effort' or 'reliable', not '{reliability}'")
        try:
            image_topics = self.get_parameter('image_topics').value
        except ParameterUninitializedException:
            image_topics = []  # '-p image_topics:=[]': an empty list has no type, so no value
        if not image_topics:
            raise ModelLoadError('image_topics is empty: name at least one camera topic')
        for name, topics in (('image_topics', image_topics),
                             ('caption_topic', [self.get_parameter('caption_topic').value]),
                             ('caption_info_topic',
                              [self.get_parameter('caption_info_topic').value])):
            for topic in topics:
                problem = topic_name_problem(topic, self.get_name(), self.get_namespace())
                if problem:
                    raise ModelLoadError(f"{name}: '{topic}' is not a valid topic name: {problem}")
        # Each topic as ROS resolves it (namespace, '~', remapping) -> the name given: two
        # spellings of one topic are one camera, and captions name the topic frames came on.
        self.image_topics = {}
        for topic in image_topics:
            self.image_topics.setdefault(self.resolve_topic_name(topic), topic)

    def _choose_prompt(self):
        """Use the training prompt if none is given; stop on a prompt the model cannot take."""
        self._prompt_from_training = None  # the prompt parameter's value, if set from training
        given = self.get_parameter('prompt').value
        problem = prompt_problem(given)
        if problem:
            raise ModelLoadError(f'{problem}; it comes from the prompt parameter')
        # The training prompt, read when first needed (None: not yet).
        self.trained_prompt = None if self.get_parameter('use_training_prompt').value else ''
        if given or self.trained_prompt is not None:
            return
        trained = self._prompt()
        if trained:
            self._set_prompt_from_training(trained)

    def _set_prompt_from_training(self, trained):
        self._prompt_from_training = trained
        self.set_parameters([Parameter('prompt', value=trained)])
        self.get_logger().info(
            f"prompt '{trained}': the one the model was trained with "
            f'({TRAINING_INFO_FILE}); set prompt to use another')

    def _prompt(self, value=None):
        """
        Return the prompt to caption with: ``value`` or the parameter's, if empty the training one.

        The training prompt is checked as it is read; a bad one raises ModelLoadError.
        """
        value = self.get_parameter('prompt').value if value is None else value
        if not value and self.trained_prompt is None:
            self.trained_prompt = training_prompt(self.get_parameter('adapter').value,
                                                  self.model_name)
        return value or self.trained_prompt

    def _on_set_parameters(self, parameters):
        changes = {parameter.name: parameter.value for parameter in parameters}
        problem = None
        if 'adapter' in changes:
            problem = self._adapter_problem(changes['adapter'])
        if not problem and 'prompt' in changes:
            problem = prompt_problem(changes['prompt'])
        captioner = self.captioner
        if not problem and captioner is not None and (
                'prompt' in changes or 'max_new_tokens' in changes):
            # Every batch would fail on a prompt and caption longer than the model's positions.
            # This only tokenizes the prompt; the model itself stays on the inference thread.
            try:
                prompt = self._prompt(changes.get('prompt'))
            except ModelLoadError as error:
                return SetParametersResult(successful=False, reason=str(error))
            problem = captioner.length_problem(
                prompt,
                changes.get('max_new_tokens', self.get_parameter('max_new_tokens').value))
        return SetParametersResult(successful=not problem, reason=problem or '')

    def _adapter_problem(self, adapter):
        """Say cheaply why ``adapter`` cannot be swapped in, or None if it can be tried."""
        if self.lifecycle_state == 'configuring':
            return ('the node is configuring (loading the model); set adapter once it is '
                    'inactive or active')
        if not adapter:
            return None
        where = f"adapter '{adapter}'"
        if self.backend == 'openai':
            return (f"{where}: backend {self.backend} captions with the server's weights; "
                    'serve a model merged with the adapter there (training.export_merged)')
        if not os.path.isdir(adapter):
            return f'{where}: no such folder'
        config_path = os.path.join(adapter, ADAPTER_CONFIG_FILE)
        if not os.path.isfile(config_path):
            return (f'{where} holds no {ADAPTER_CONFIG_FILE}: give the folder that the '
                    'training package (save_pretrained) wrote')
        try:
            with open(config_path, encoding='utf-8') as stream:
                recorded = json.load(stream).get('base_model_name_or_path')
        except (OSError, ValueError, AttributeError) as error:
            return f'{where}: cannot read {ADAPTER_CONFIG_FILE}: {_first_line(error)}'
        if recorded and not same_base_model(str(recorded), self.model_name):
            return (f"{where} was trained on '{recorded}', not on the loaded model "
                    f"'{self.model_name}'")
        return None

    def _after_set_parameters(self, parameters):
        for parameter in parameters:
            if parameter.name == 'adapter':
                self._request_adapter(parameter.value)

    @staticmethod
    def _camera_qos(reliability):
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, durability=DurabilityPolicy.VOLATILE,
            reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                         else ReliabilityPolicy.BEST_EFFORT))

    # Adapter swap at run time --------------------------------------------------------------

    def _request_adapter(self, adapter):
        """Load ``adapter`` in the background if a model is loaded (configure loads it else)."""
        with self._lock:
            if self.captioner is None:
                return
            self._wanted_adapter = adapter
            if self._adapter_loader is None:  # a running loader takes the newest wish next
                self._adapter_loader = threading.Thread(
                    target=self._load_adapters, name=ADAPTER_LOADER_THREAD, daemon=True)
                self._adapter_loader.start()

    def _load_adapters(self):
        while True:
            with self._lock:
                adapter, generation = self._wanted_adapter, self._generation
                self._wanted_adapter = None
                if adapter is None or self._stopping or self.captioner is None:
                    self._adapter_loader = None
                    return
            if adapter != self.loaded_adapter:
                self._load_adapter(adapter, generation)

    def _load_adapter(self, adapter, generation):
        """Load the base model with ``adapter`` and hand it to the inference thread."""
        self.get_logger().info(f'loading {_weights_name(adapter)}; the current weights '
                               'caption until it is ready')
        try:
            trained = (training_prompt(adapter, self.model_name)
                       if self.get_parameter('use_training_prompt').value else '')
            prompt = self._prompt_after_swap(trained) or trained
            captioner = make_captioner(self._captioner_config(adapter, prompt))
        except Exception as error:  # noqa: B902 -- the old weights caption on; say why
            self._adapter_failed(adapter, str(error) if isinstance(error, ModelLoadError)
                                 else _first_line(error))
            return
        swap = AdapterSwap(adapter, captioner, generation, trained)
        del captioner
        with self._work_ready:
            if self._generation != generation or self.captioner is None:
                return  # cleaned up meanwhile
            self._pending_swap = swap
            self._work_ready.notify()
        # One swap at a time: a third copy of the weights would not fit on a small robot.
        while not swap.done.wait(timeout=0.2):
            if self._stopping or self._generation != generation or not (
                    self._worker and self._worker.is_alive()):
                return

    def _prompt_after_swap(self, trained):
        """Return the prompt parameter's value for new weights trained with ``trained``."""
        current = self.get_parameter('prompt').value
        if self._prompt_from_training is not None and current == self._prompt_from_training:
            return trained  # it came from the old weights' training, not from the user
        return current

    def _adapter_failed(self, adapter, message):
        problem = (f'{_weights_name(adapter)} not loaded: {message}; still captioning with '
                   f'{_weights_name(self.loaded_adapter)}')
        self.get_logger().error(problem)
        self.adapter_problem = problem
        # The parameter says what captions: back to the weights in use, unless a newer value
        # is on its way.
        if self.get_parameter('adapter').value == adapter and self._wanted_adapter is None:
            self.set_parameters([Parameter('adapter', value=self.loaded_adapter)])

    def _swap_in(self, swap):
        """On the inference thread: warm the new weights up, then caption with them."""
        try:
            if swap.generation != self._generation:
                return
            prompt = self._prompt_after_swap(swap.trained_prompt) or swap.trained_prompt
            try:
                self._warm_up(swap.captioner, prompt)  # only compiling takes a while
            except ModelLoadError as error:
                self._adapter_failed(swap.adapter, str(error))
                return
            with self._lock:
                old, self.captioner = self.captioner, swap.captioner
                self.loaded_adapter = swap.adapter
                self.adapter_prompt = adapter_training_prompt(swap.adapter)
                self.adapter_problem = None
            new_prompt = self._prompt_after_swap(swap.trained_prompt)
            self.trained_prompt = swap.trained_prompt
            if new_prompt != self.get_parameter('prompt').value:
                self._set_prompt_from_training(new_prompt)
            if hasattr(old, 'close'):
                old.close()
            device = getattr(old, 'device', None)
            del old
            self._free_memory(device)
            self.get_logger().info(
                f'captioning with {_weights_name(swap.adapter, self.adapter_prompt)}'
                + self._memory_note(device))
        finally:
            swap.captioner = None  # the node holds it now, or nobody does
            swap.done.set()

    # Input ---------------------------------------------------------------------------------

    def _on_frame(self, topic, message):
        now = time.monotonic()
        with self._lock:
            camera = self.cameras[topic]
            if camera.pending:
                camera.replaced += 1
            camera.latest_message = message
            camera.latest_receive_time = now
            camera.pending = True
            camera.received += 1
            camera.input_rate.tick(now)
            self._work_ready.notify()

    def _convert(self, topic, message, for_camera=True):
        try:
            frame = message_to_rgb(message, max_pixels=self.max_pixels,
                                   min_size=self.decode_min_size)
        except ImageConversionError as error:
            with self._lock:
                self.rejected[error.reason] = self.rejected.get(error.reason, 0) + 1
                camera = self.cameras[topic]
                if for_camera:
                    camera.rejected[error.reason] = camera.rejected.get(error.reason, 0) + 1
                camera.rejection = error
            self.get_logger().warning(f'dropped a frame from {topic}: {error}',
                                      throttle_duration_sec=5.0)
            return None
        with self._lock:
            self.cameras[topic].rejection = None
        return frame

    # Inference: all of it on the worker thread ---------------------------------------------

    def _run_worker(self, config, stop, loaded):
        """Load the model and warm it up, then caption until the model is released."""
        try:
            captioner = make_captioner(config)
            self._log_loaded(captioner, config.adapter)
            if self._warm_up_batch_sizes(captioner):
                self.phase = 'warming up (compiling)'  # a swap's warm-up keeps the phase
            self._warm_up(captioner, config.prompt)
            with self._lock:
                if stop.is_set():
                    return  # released (or the node destroyed) while it loaded
                self.captioner = captioner
                self.loaded_adapter = config.adapter
                self.adapter_prompt = adapter_training_prompt(config.adapter)
                # Large JPEGs decode at a reduced scale that still covers the model's input.
                self.decode_min_size = (captioner.image_size
                                        if captioner.fast_preprocessing else None)
            del captioner
        except Exception as error:  # noqa: B902 -- the configure transition reports it
            self._load_error = (str(error) if isinstance(error, ModelLoadError)
                                else f'loading the model failed: {_first_line(error)}')
            return
        finally:
            loaded.set()
        try:
            if self.backend == 'openai':
                self._check_server()
            self._inference_loop(stop)
        finally:
            # Nobody else answers a caption_now call once this thread is gone.
            with self._lock:
                waiting, self._requests = list(self._requests), deque()
            for request in waiting:
                request.done.set()

    def _check_server(self):
        """Say at start-up whether the server answers and serves the model; never block."""
        problem = self.captioner.check()
        if problem is None:
            self.get_logger().info(f'the server at {self.captioner.server_url} serves '
                                   f"'{self.model_name}'")
        else:
            # Captioning goes on: requests retry with backoff until the server answers.
            self.get_logger().error(problem)

    def _inference_loop(self, stop):
        while not stop.is_set() and not self._stopping:
            try:
                work = self._take_pending()
                if isinstance(work, AdapterSwap):
                    self._swap_in(work)
                elif isinstance(work, CaptionRequest):
                    self._answer(work)
                elif work:
                    # After running out of memory, batches stay at the size that was lowered to.
                    size = min(self.max_batch_size, self.oom_batch_limit or self.max_batch_size)
                    for start in range(0, len(work), size):
                        self._run_batch(work[start:start + size])
            except Exception as error:  # noqa: B902 -- a dead thread would end captioning
                if stop.is_set() or self._shutting_down:
                    return  # released, or Ctrl-C, while this batch was in flight
                with self._lock:
                    self.failed_batches += 1
                self.get_logger().error(f'the inference thread hit an error and goes on: '
                                        f'{error!r}', throttle_duration_sec=5.0)
                time.sleep(0.1)  # an error that repeats must not keep a core busy

    def _seconds_to_next_batch(self):
        """Return how long max_rate_hz still holds the next batch back (0 or less: not)."""
        # Read on every pass, so that a changed rate counts from the last batch at once.
        max_rate_hz = self.get_parameter('max_rate_hz').value
        if max_rate_hz <= 0 or self._last_batch_start is None:
            return 0.0
        return self._last_batch_start + 1.0 / max_rate_hz - time.monotonic()

    def _frames_pending(self):
        return self.active and self.enabled and any(
            camera.pending for camera in self.cameras.values())

    def _take_pending(self):
        """
        Wait briefly for work; return an adapter swap, a caption_now request, frames, or None.

        Frames are [(topic, message, receive_time)], one per camera with a new frame, when the
        node is active, captioning is enabled and max_rate_hz allows a batch. Swaps and
        caption_now requests go first and ignore all three.
        """
        stop = self._worker_stop

        def urgent():
            return stop.is_set() or self._stopping or self._pending_swap or self._requests

        with self._work_ready:
            wait = self._seconds_to_next_batch()
            if wait > 0:
                # Short waits, so that a higher max_rate_hz takes effect within 0.1 s.
                self._work_ready.wait_for(urgent, timeout=min(wait, 0.1))
            else:
                self._work_ready.wait_for(lambda: urgent() or self._frames_pending(),
                                          timeout=0.5)
            if stop.is_set() or self._stopping:
                return None
            if self._pending_swap:
                swap, self._pending_swap = self._pending_swap, None
                return swap
            if self._requests:
                return self._requests.popleft()
            if self._seconds_to_next_batch() > 0 or not self._frames_pending():
                return None
            self._last_batch_start = time.monotonic()
            batch = []
            for camera in self.cameras.values():
                if camera.pending:
                    camera.pending = False
                    batch.append((camera.topic, camera.latest_message,
                                  camera.latest_receive_time))
            return batch

    def _answer(self, request):
        """Caption the frame a caption_now call asked for and hand the answer back to it."""
        try:
            # The frame was counted for its camera when the loop took it, or will be.
            captions, problem = self._run_batch([request.item], for_camera=False)
            request.success = bool(captions)
            if captions:
                request.message = captions[0]
            elif problem:
                request.message = problem
            else:
                topic = request.item[0]
                request.message = (f'the newest frame, from {topic}, was rejected: '
                                   f'{self.cameras[topic].rejection}')
        finally:
            request.done.set()

    def _run_batch(self, batch, for_camera=True):
        """
        Caption one batch, counting a failure; return (captions, why it failed or None).

        ``for_camera``: count each frame's outcome for its camera too (not for a caption_now
        call, which captions a camera's newest frame again).
        """
        out_of_memory = False
        try:
            return self._caption_and_publish(batch, for_camera), None
        except NoCaptionError as error:
            return [], str(error)  # counted per frame and logged already
        except torch.OutOfMemoryError:
            out_of_memory = True
            lowered = len(batch) // 2  # 0: a single frame cannot be split
            with self._lock:
                self.oom_batches += 1
                if lowered:
                    self.oom_batch_limit = lowered
            then = f', batches of at most {lowered} from now on' if lowered else ''
            problem = (f'out of GPU memory on a batch of {len(batch)}; skipped it{then}. '
                       'Lower max_batch_size or use a smaller dtype/model')
        except Exception as error:  # noqa: B902 -- one bad batch must not stop captioning
            if self._shutting_down:
                raise
            with self._lock:
                self.failed_batches += 1
            problem = f'captioning failed: {_first_line(error)}'
        if out_of_memory:
            # Only now, outside the except clause: its traceback held the failed batch's
            # tensors. What is freed goes back to the GPU for the next, smaller batch.
            gc.collect()
            torch.cuda.empty_cache()
        self.get_logger().error(problem, throttle_duration_sec=5.0)
        return [], problem

    def _caption_and_publish(self, batch, for_camera):
        """Convert, caption and publish one batch; return the captions (none if all rejected)."""
        frames, kept = [], []
        for topic, message, receive_time in batch:
            frame = self._convert(topic, message, for_camera)
            if frame is not None:
                frames.append(frame)
                kept.append((topic, message, receive_time))
        if not frames:
            return []
        prompt = self._prompt()
        max_new_tokens = self.get_parameter('max_new_tokens').value
        captioner = self.captioner  # swapped only on this thread, between batches
        started = time.monotonic()
        try:
            # A frame whose scores turned NaN or inf comes back as a failure.
            results = caption_results(captioner, frames, prompt=prompt,
                                      max_new_tokens=max_new_tokens)
        except Exception as error:  # noqa: B902 -- _run_batch says what failed
            reason = ('out_of_memory' if isinstance(error, torch.OutOfMemoryError)
                      else 'caption_failed')
            self._count_dropped([(topic, reason) for topic, _, _ in kept], for_camera)
            raise
        finished = time.monotonic()
        inference_ms = (finished - started) * 1000.0
        captions, published_items, failures = [], [], []
        for (topic, message, receive_time), result in zip(kept, results):
            if isinstance(result, Exception):
                failures.append((topic, result))
                continue
            captions.append(result)
            published_items.append((topic, receive_time))
            self.caption_publisher.publish(String(data=result))
            self.caption_info_publisher.publish(String(data=json.dumps({
                'caption': result, 'source_topic': topic,
                'stamp': _stamp_dict(message.header), 'frame_id': message.header.frame_id,
                'prompt': prompt, 'model': self.model_name, 'backend': self.backend,
                'server': captioner.server_url if self.backend == 'openai' else None,
                'adapter': self.loaded_adapter,
                'adapter_training_prompt': self.adapter_prompt,
                'inference_ms': round(inference_ms, 3), 'batch_size': len(frames),
            })))
        published = time.monotonic()
        with self._lock:
            if captions:
                self.inference_ms.append(inference_ms)
            for topic, receive_time in published_items:
                self.end_to_end_ms.append((published - receive_time) * 1000.0)
                if for_camera:
                    self.cameras[topic].captioned += 1
            self.captions_published += len(captions)
            self.caption_rate.tick(published, len(captions))
        self._count_dropped([(topic, failure.reason) for topic, failure in failures],
                            for_camera)
        if failures:
            topic, failure = failures[0]
            self.get_logger().error(f'no caption for a frame from {topic}: {failure}',
                                    throttle_duration_sec=5.0)
            if not captions:
                raise NoCaptionError(str(failure))
        return captions

    def _count_dropped(self, drops, for_camera):
        """Count frames that got no caption, given as (topic, reason), per reason and camera."""
        with self._lock:
            for topic, reason in drops:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                if for_camera:
                    camera = self.cameras[topic]
                    camera.dropped[reason] = camera.dropped.get(reason, 0) + 1

    # Services ------------------------------------------------------------------------------

    def _on_enable(self, request, response):
        with self._work_ready:
            self.enabled = bool(request.data)
            self._work_ready.notify()
        response.success = True
        response.message = 'captioning enabled' if self.enabled else 'captioning paused'
        if not self.active:
            response.message += (f' (the node is {self.lifecycle_state}: it captions once it '
                                 'is activated)')
        self.get_logger().info(response.message)
        return response

    def _on_caption_now(self, request, response):
        response.success = False
        if not self.active:
            response.message = (f'not active: the node is {self.lifecycle_state}; activate it '
                                'first (lifecycle transition activate)')
            return response
        if not self._worker.is_alive():
            response.message = WORKER_STOPPED
            return response
        with self._work_ready:
            received = [camera for camera in self.cameras.values()
                        if camera.latest_message is not None]
            newest = max(received, key=lambda camera: camera.latest_receive_time, default=None)
            if newest is None:
                response.message = 'no frame received yet on ' + ', '.join(self.cameras)
                return response
            caption_request = CaptionRequest(
                (newest.topic, newest.latest_message, newest.latest_receive_time))
            self._requests.append(caption_request)
            self._work_ready.notify()
        if not caption_request.done.wait(CAPTION_NOW_TIMEOUT):
            with self._lock:
                if caption_request in self._requests:  # not started: nobody waits for it now
                    self._requests.remove(caption_request)
            response.message = (f'no caption within {CAPTION_NOW_TIMEOUT:g} s: the '
                                'inference thread is busy; try again')
            return response
        response.success = caption_request.success
        response.message = caption_request.message
        return response

    # Diagnostics ---------------------------------------------------------------------------

    def statistics(self):
        """Return a snapshot of the counters shown on /diagnostics."""
        now = time.monotonic()
        with self._lock:
            return {
                'lifecycle_state': self.lifecycle_state,
                'enabled': self.enabled,
                'inference_thread_alive': self._worker is not None and self._worker.is_alive(),
                'cameras': {topic: {
                    'received': camera.received, 'replaced': camera.replaced,
                    'input_rate_hz': camera.input_rate.rate(now),
                    'seconds_since_last_frame': (None if camera.latest_receive_time is None
                                                 else now - camera.latest_receive_time),
                    'rejection': camera.rejection and camera.rejection.reason,
                    'captioned': camera.captioned,
                    'rejected': sum(camera.rejected.values()),
                    'rejected_by_reason': dict(camera.rejected),
                    'dropped': sum(camera.dropped.values()),
                    'dropped_by_reason': dict(camera.dropped),
                    'pending': camera.pending,
                    'incompatible_qos': camera.incompatible_qos,
                } for topic, camera in self.cameras.items()},
                'captions_published': self.captions_published,
                'captions_per_second': self.caption_rate.rate(now),
                'inference_ms_p50': percentile(list(self.inference_ms), 50),
                'inference_ms_p95': percentile(list(self.inference_ms), 95),
                'end_to_end_ms_p50': percentile(list(self.end_to_end_ms), 50),
                'end_to_end_ms_p95': percentile(list(self.end_to_end_ms), 95),
                'replaced_frames': sum(c.replaced for c in self.cameras.values()),
                'rejected_frames': sum(self.rejected.values()),
                'rejected_by_reason': dict(self.rejected),
                'oom_batches': self.oom_batches,
                'oom_batch_limit': self.oom_batch_limit,
                'failed_batches': self.failed_batches,
                'dropped_frames': sum(self.dropped.values()),
                'dropped_by_reason': dict(self.dropped),
                'server_problem': (None if self.backend != 'openai' or self.captioner is None
                                   or self.captioner.problem is None
                                   else str(self.captioner.problem)),
            }

    def _publish_diagnostics(self):
        stats = self.statistics()
        # Frames are decoded by their bytes; a format label that names another codec is told
        # to the publisher's owner once, and the frames are captioned all the same.
        label_notes = format_label_mismatches()
        for note in label_notes[self._label_notes_logged:]:
            self.get_logger().warning(note)
        self._label_notes_logged = len(label_notes)
        state = stats['lifecycle_state']
        problems = self._problems(stats) if state in ('inactive', 'active') else []
        if self.adapter_problem:
            problems.append(self.adapter_problem)
        if state == 'unconfigured' and self.configure_error:
            problems.append(f'configure failed: {self.configure_error}')
        level = DiagnosticStatus.OK
        if problems:
            serious = (stats['server_problem'] or state == 'unconfigured'
                       or not stats['inference_thread_alive'])
            level = DiagnosticStatus.ERROR if serious else DiagnosticStatus.WARN
        if problems:
            message = '; '.join(problems)
        elif state == 'active':
            message = 'captioning' if stats['enabled'] else 'paused'
        else:
            message = f'{state}: {self.phase}'
        captioner = self.captioner
        device = str(captioner.device) if captioner is not None else ''
        status = DiagnosticStatus(level=level, name=f'{self.get_name()}: captioning',
                                  hardware_id=device, message=message)
        values = {
            'lifecycle_state': state,
            'backend': self.backend,
            'model': self.model_name, 'adapter': self.loaded_adapter,
            'adapter_training_prompt': ('' if self.adapter_prompt is None
                                        else repr(self.adapter_prompt)),
            'device': device,
            'dtype': (str(captioner.dtype).replace('torch.', '')
                      if captioner is not None else ''),
            'enabled': stats['enabled'],
            'captions_published': stats['captions_published'],
            'captions_per_second': f"{stats['captions_per_second']:.2f}",
            'inference_ms_p50': f"{stats['inference_ms_p50']:.1f}",
            'inference_ms_p95': f"{stats['inference_ms_p95']:.1f}",
            'end_to_end_ms_p50': f"{stats['end_to_end_ms_p50']:.1f}",
            'end_to_end_ms_p95': f"{stats['end_to_end_ms_p95']:.1f}",
            'replaced_frames': stats['replaced_frames'],
            'rejected_frames': stats['rejected_frames'],
            'oom_batches': stats['oom_batches'],
            'failed_batches': stats['failed_batches'],
            'dropped_frames': stats['dropped_frames'],
            'format_label_mismatches': len(label_notes),
        }
        for reason, count in sorted(stats['rejected_by_reason'].items()):
            values[f'rejected_{reason}'] = count
        for reason, count in sorted(stats['dropped_by_reason'].items()):
            values[f'dropped_{reason}'] = count
        for topic, camera in stats['cameras'].items():
            values[f'input_rate_hz {topic}'] = f"{camera['input_rate_hz']:.2f}"
            values[f'received {topic}'] = camera['received']
            values[f'replaced {topic}'] = camera['replaced']
            values[f'captioned {topic}'] = camera['captioned']
            values[f'rejected {topic}'] = camera['rejected']
            values[f'dropped {topic}'] = camera['dropped']
        status.values = [KeyValue(key=key, value=str(value)) for key, value in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)

    def _problems(self, stats):
        """Return what is wrong while the model is loaded, worst first."""
        stale_after = self.get_parameter('stale_input_timeout').value
        listening = time.monotonic() - self.listening_since
        problems = []
        if stats['server_problem']:
            problems.append(stats['server_problem'])
        if not stats['inference_thread_alive']:
            problems.append(WORKER_STOPPED)
        for topic, camera in stats['cameras'].items():
            if not self.active:
                break  # an inactive node listens to no camera
            age = camera['seconds_since_last_frame']
            if (age is None and listening > stale_after) or (
                    age is not None and age > stale_after):
                problems.append(f'no frames on {topic} for {stale_after:g} s: check the topic '
                                'name and that reliability matches the publisher')
            if camera['incompatible_qos']:
                policy = camera['incompatible_qos']
                problems.append(f'a publisher on {topic} has an incompatible QoS ({policy}): '
                                + _qos_fix(policy))
            if camera['rejection']:
                problems.append(f'the newest frame from {topic} was rejected '
                                f"({camera['rejection']}): see the node's log")
        new_rejections = stats['rejected_frames'] - self._rejected_at_last_report
        self._rejected_at_last_report = stats['rejected_frames']
        if new_rejections:
            problems.append(f'{new_rejections} frames rejected since the last report')
        if stats['oom_batches']:
            lowered = (f", batches lowered to {stats['oom_batch_limit']}"
                       if stats['oom_batch_limit'] else '')
            problems.append(f"{stats['oom_batches']} batches skipped: out of GPU memory"
                            f'{lowered}; lower max_batch_size or use a smaller dtype/model')
        if stats['failed_batches']:
            problems.append(f"{stats['failed_batches']} batches failed: see the node's log")
        new_drops = stats['dropped_frames'] - self._dropped_at_last_report
        self._dropped_at_last_report = stats['dropped_frames']
        if new_drops:
            problems.append(f'{new_drops} frames got no caption since the last report')
        problems += self._model_output_problems(stats)
        return problems

    def _model_output_problems(self, stats):
        """Say what to try when the model gave NaN or inf scores or empty captions lately."""
        problems = []
        for reason, what, hint in MODEL_OUTPUT_PROBLEMS:
            count = stats['dropped_by_reason'].get(reason, 0)
            new = count - self._model_output_at_last_report.get(reason, 0)
            self._model_output_at_last_report[reason] = count
            if new:
                problems.append(f'{new} {what} since the last report, not published: {hint}')
        return problems

    def destroy_node(self):
        """Stop the inference thread and release the model, then tear down ROS."""
        self._stopping = True
        if hasattr(self, '_worker'):  # not if __init__ stopped early (rclpy.shutdown calls this)
            # Still loading or compiling: that cannot be cut short, so nothing waits for it.
            self._release_model()
        Node.destroy_node(self)
        # rclpy's lifecycle node leaves its state machine (and with it the node handle and the
        # transition_event publisher) alive until garbage collection, so the node would stay in
        # the ROS graph, under its name, after destroy_node().
        # Not while the autostart thread may still step it: then it goes with the node object.
        if hasattr(self, '_state_machine') and not getattr(self, '_autostarting', False):
            self._state_machine.destroy_when_not_in_use()


def keep_large_buffers_in_the_heap():
    """
    Stop glibc from mapping and unmapping memory for every image-sized buffer; return success.

    Every raw frame makes rclpy allocate its pixel buffer (6 MB at 1080p) and free it again.
    Above glibc's mmap threshold each allocation is a fresh mapping whose pages fault in one by
    one and each free unmaps them: 15 to 20 ms per 1080p frame on a loaded 2-core machine
    (benchmarks/bench_node_overhead.py). Served from the heap, the same pages are reused.
    Process-wide, so call it from a program's entry point; a no-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    # malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3. 32 MiB, the largest threshold glibc
    # accepts on 64-bit, holds a 4K rgb8 frame; up to 64 MiB of freed heap is kept for reuse.
    return bool(mallopt(-1, 64 << 20)) and bool(mallopt(-3, 32 << 20))


def main(args=None):
    """Run the caption node until Ctrl-C, shutdown or finalized; exit 1 if it cannot start."""
    keep_large_buffers_in_the_heap()
    # A progress bar redraws with carriage returns, which a ROS log file keeps as clutter; the
    # node logs one line when the model is loaded.
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    rclpy.init(args=args)
    node = None
    exit_code = 0
    try:
        node = CaptionNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        # The model loads on a thread of its own (autostart, or a configure transition), so
        # the node spins from the start and Ctrl-C ends this at any moment.
        executor.spin_until_future_complete(node.finished)
        if node.finished.done():
            exit_code = node.finished.result()
            # The shutdown transition's answer is sent after its callback returns, and DDS
            # writes it out from a thread of its own: give both a moment before the process ends.
            executor.shutdown(timeout_sec=5.0)
            time.sleep(0.5)
    except (ModelLoadError, ParameterException) as error:
        # Bad settings and models are the user's to fix: one line, no traceback.
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        exit_code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RCLError:
        # A stop signal can invalidate the context while the executor builds its wait set
        # (Jazzy's rclpy raises this then, not ExternalShutdownException).
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    if any(thread.name in (INFERENCE_THREAD, ADAPTER_LOADER_THREAD) and thread.is_alive()
           for thread in threading.enumerate()):
        # A thread may still be loading or compiling (which cannot be cut short), or
        # captioning past destroy_node's wait: Python's exit would end it inside torch, which
        # aborts the process ('terminate called without an active exception').
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


if __name__ == '__main__':
    raise SystemExit(main())
