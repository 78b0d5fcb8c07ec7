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
Caption through an OpenAI-compatible server (vLLM) instead of a model in this process.

Each frame is resized here to the model's input size, exactly as the local backend resizes it,
encoded as a lossless PNG data URL and sent in its own ``/v1/chat/completions`` request; the
frames of one batch are in flight together, so the server batches them. A frame whose request
fails comes back as a :class:`CaptionFailure` in its place, and the other frames keep their
captions. After a failure that retrying cannot fix soon (server down, wrong model name or key)
requests pause, with a growing backoff, instead of hammering the server.
"""

import base64
from concurrent.futures import ThreadPoolExecutor
import os
import threading
import time
from urllib.parse import urlparse

from blip2_ros.checkpoint import ModelLoadError, one_line
from blip2_ros.preprocess import resize_like_pil
import cv2
import numpy as np
import torch

# Seconds between attempts while the server cannot be used: doubles from the first to the last,
# so a server that comes back is used within seconds without being hammered while it is down.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 8.0
# PNG compression level 1: about as small as the default for photos, several times faster.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
# Failures that the next request would meet too. A timeout or a rejected request concerns one
# frame only.
LASTING_REASONS = ('server_unreachable', 'server_auth', 'server_wrong_model')


class CaptionFailure(Exception):
    """
    A frame that got no caption; ``reason`` is a short counter key, the message one line.

    ``lasting`` failures (server down, wrong model name or key) would fail the next request
    too, so requests pause with backoff after one.
    """

    def __init__(self, reason, message):
        """Keep the counter key (e.g. 'server_timeout') next to the message."""
        super().__init__(message)
        self.reason = reason
        self.lasting = reason in LASTING_REASONS


def png_data_url(frame, size):
    """Resize an HxWx3 uint8 RGB frame to ``size`` (height, width) and return a PNG data URL."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'expected an HxWx3 uint8 RGB frame, got {frame.dtype} {frame.shape}')
    if tuple(frame.shape[:2]) != tuple(size):
        image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)
        frame = resize_like_pil(image, tuple(size), 'bicubic')[0].permute(1, 2, 0).numpy()
    ok, png = cv2.imencode('.png', np.ascontiguousarray(frame[:, :, ::-1]), PNG_PARAMS)
    if not ok:
        raise ValueError('PNG encoding failed')
    return 'data:image/png;base64,' + base64.b64encode(png.tobytes()).decode('ascii')


def check_server_url(url):
    """Return why ``url`` is not the base URL of an OpenAI-compatible server, or None."""
    parsed = urlparse(url or '')
    if parsed.scheme not in ('http', 'https') or not parsed.netloc:
        return (f"server_url '{url}' is not an http(s) URL: give the server's base URL, "
                'e.g. http://127.0.0.1:8000/v1')
    return None


class ServerCaptioner:
    """Captions batches of uint8 RGB frames through an OpenAI-compatible server."""

    backend = 'openai'
    compile_decode = False
    fast_preprocessing = True

    def __init__(self, config):
        """Set up the client; raise ModelLoadError for settings that cannot work."""
        from openai import OpenAI

        self.config = config
        problem = check_server_url(config.server_url)
        if problem:
            raise ModelLoadError(problem)
        if not config.model:
            raise ModelLoadError('model must name the model the server serves')
        if config.request_timeout <= 0:
            raise ModelLoadError(
                f'request_timeout must be more than 0 s, not {config.request_timeout}')
        api_key = 'EMPTY'  # what vLLM expects when it was started without --api-key
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env, '')
            if not api_key:
                raise ModelLoadError(
                    f'the environment variable {config.api_key_env} (api_key_env) is not set '
                    'or empty: export the API key in it before starting, or clear api_key_env')
        self.server_url = config.server_url.rstrip('/')
        self.model_name = config.model
        self.image_size = (config.server_image_size, config.server_image_size)
        self.device = self.server_url  # where the captions are made, for logs and diagnostics
        self.dtype = 'server'
        # The client's own retries would hold a frame for seconds; a newer frame is better.
        self.client = OpenAI(base_url=self.server_url, api_key=api_key,
                             timeout=config.request_timeout, max_retries=0)
        self._pool = ThreadPoolExecutor(max_workers=max(1, config.max_in_flight),
                                        thread_name_prefix='blip2_request')
        self._lock = threading.Lock()
        self._backoff_s = 0.0
        self._paused_until = 0.0
        self.problem = None  # the last failure that pauses requests, for diagnostics
        self.served_models = None

    # The local backend's interface ---------------------------------------------------------

    def warm_up(self, batch_sizes=(1,), prompt=None):
        """Nothing is compiled here; the node checks the server with :meth:`check`."""

    def length_problem(self, prompt, max_new_tokens):
        """Return None: the server knows its model's limit and rejects a request over it."""
        return None

    def close(self):
        """Stop the request threads and close the connection pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # Requests -------------------------------------------------------------------------------

    def check(self):
        """
        Ask the server which models it serves; return None if it serves ours, else why not.

        A failure pauses requests with backoff, as a failed caption does.
        """
        try:
            served = [model.id for model in self.client.models.list()]
        except Exception as error:  # noqa: B902 - sorted by _failure
            return self._fail(self._failure(error))
        self.served_models = served
        if self.model_name not in served:
            return self._fail(CaptionFailure('server_wrong_model', (
                f'the server at {self.server_url} does not serve a model named '
                f"'{self.model_name}' (it serves: {', '.join(served) or 'none'}); set model "
                'to one of those')))
        self._succeed()
        return None

    def caption(self, frames, prompt=None, max_new_tokens=None):
        """
        Caption a batch of HxWx3 uint8 RGB frames, one request per frame, all in flight at once.

        Returns one item per frame: its caption, or a :class:`CaptionFailure` saying why it has
        none (while requests are paused, every frame fails at once without a request).
        """
        frames = list(frames)
        prompt = self.config.prompt if prompt is None else prompt
        prompts = [prompt] * len(frames) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(frames):
            raise ValueError(f'{len(prompts)} prompts for {len(frames)} frames')
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        with self._lock:
            paused_s = self._paused_until - time.monotonic()
            problem = self.problem
        if paused_s > 0 and problem is not None:
            failure = CaptionFailure(problem.reason, f'{problem} (next try in {paused_s:.0f} s)')
            return [failure] * len(frames)
        urls = [png_data_url(frame, self.image_size) for frame in frames]
        futures = [self._pool.submit(self._request, url, text, max_new_tokens)
                   for url, text in zip(urls, prompts)]
        return [future.result() for future in futures]

    def _request(self, image_url, prompt, max_new_tokens):
        content = [{'type': 'image_url', 'image_url': {'url': image_url}}]
        if prompt:
            content.append({'type': 'text', 'text': prompt})
        try:
            response = self.client.chat.completions.create(
                model=self.model_name, messages=[{'role': 'user', 'content': content}],
                max_tokens=max_new_tokens, temperature=0.0)
        except Exception as error:  # noqa: B902 - sorted by _failure
            failure = self._failure(error)
            if failure.lasting:
                self._fail(failure)
            return failure
        self._succeed()
        # vLLM may start the answer with the space that followed the prompt's last word.
        return (response.choices[0].message.content or '').strip()

    def _failure(self, error):
        """Turn a client exception into a CaptionFailure with a one-line, actionable message."""
        import openai

        where = f'the server at {self.server_url}'
        if isinstance(error, openai.APITimeoutError):
            return CaptionFailure('server_timeout', (
                f'{where} did not answer within request_timeout '
                f'{self.config.request_timeout:g} s; the frame was dropped'))
        if isinstance(error, openai.APIConnectionError):
            return CaptionFailure('server_unreachable', (
                f'cannot reach {where} ({_cause(error)}): is it running? Start it with '
                'scripts/serve_vllm.py'))
        if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
            variable = self.config.api_key_env or 'api_key_env'
            return CaptionFailure('server_auth', (
                f'{where} refused the API key (HTTP {error.status_code}): check the key in '
                f'the environment variable {variable}'))
        if isinstance(error, openai.NotFoundError):
            return CaptionFailure('server_wrong_model', (
                f"{where} has no model named '{self.model_name}' (HTTP 404): set model to the "
                "name the server serves (vLLM's --served-model-name)"))
        if isinstance(error, openai.APIStatusError):
            return CaptionFailure('server_rejected', (
                f'{where} rejected the request (HTTP {error.status_code}): '
                f'{one_line(_status_message(error))}'))
        return CaptionFailure('server_error', f'request to {where} failed: {one_line(error)}')

    def _fail(self, failure):
        with self._lock:
            self._backoff_s = min(max(self._backoff_s * 2, FIRST_BACKOFF_S), MAX_BACKOFF_S)
            self._paused_until = time.monotonic() + self._backoff_s
            self.problem = failure
        return str(failure)

    def _succeed(self):
        with self._lock:
            self._backoff_s = 0.0
            self._paused_until = 0.0
            self.problem = None


def _cause(error):
    cause = error.__cause__ or error.__context__
    return one_line(cause) if cause else 'connection failed'


def _status_message(error):
    body = getattr(error, 'body', None)
    if isinstance(body, dict):
        return body.get('message') or body.get('error', {}).get('message') or str(error)
    return str(error)
