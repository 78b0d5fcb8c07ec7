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
Frame preprocessing: HxWx3 uint8 RGB frames to a BLIP-2 checkpoint's ``pixel_values``.

Frames go to the model's device as uint8 and are resized there the way PIL resizes them inside
the checkpoint's own image processor, then rescaled and normalised in one multiply-add. Image
processor settings this fast path does not cover go through the image processor itself.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F

LOGGER = logging.getLogger(__name__)

# PIL resample codes used by Hugging Face image processors -> torch interpolation modes.
RESAMPLE_MODES = {2: 'bilinear', 3: 'bicubic'}


def resize_like_pil(image, size, mode):
    """
    Resize a 1x3xHxW uint8 image to ``size`` with antialiasing, the way PIL resamples uint8.

    On the CPU this is torch's uint8 kernel, which follows PIL's integer arithmetic to within
    one level. Other devices have no uint8 kernel, so the image is resized in float one axis
    at a time, horizontal pass first, rounded and clipped to 0..255 after each pass as PIL's
    uint8 intermediate image is: bicubic overshoots, and clipping only at the end is off by up
    to 20 levels when upscaling. The result is uint8 on the CPU and integral float elsewhere.
    Pillow 13 resizes some tall images vertically first, which moves the clipping; that differs
    from this by a level or two on natural images and more on noise.
    """
    if image.dtype == torch.uint8 and image.device.type == 'cpu':
        image = image.contiguous(memory_format=torch.channels_last)
        return F.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False)
    image = image.float()
    height, width = image.shape[-2:]
    if width != size[1]:
        image = _round_half_up_to_uint8_range(F.interpolate(
            image, size=(height, size[1]), mode=mode, antialias=True, align_corners=False))
    if height != size[0]:
        image = _round_half_up_to_uint8_range(F.interpolate(
            image, size=tuple(size), mode=mode, antialias=True, align_corners=False))
    return image


def _round_half_up_to_uint8_range(image):
    # PIL rounds halves up; torch.round rounds them to even, and bilinear weights make many
    # exact halves.
    return image.add_(0.5).floor_().clamp_(0, 255)


def _fast_path_size(image_processor):
    """Return the (height, width) the fast path resizes to, or None if it cannot stand in."""
    size = image_processor.size
    height = size.get('height') if hasattr(size, 'get') else getattr(size, 'height', None)
    width = size.get('width') if hasattr(size, 'get') else getattr(size, 'width', None)
    covered = (bool(image_processor.do_resize) and height is not None and width is not None
               and int(getattr(image_processor, 'resample', 3)) in RESAMPLE_MODES
               and not getattr(image_processor, 'do_center_crop', False)
               and not getattr(image_processor, 'do_pad', False))
    return (int(height), int(width)) if covered else None


def _as_rgb_array(frame):
    """Return a frame as a C-contiguous, writeable HxWx3 uint8 array torch can wrap."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'expected an HxWx3 uint8 RGB frame, got {frame.dtype} {frame.shape}')
    # Views such as frame[..., ::-1] (BGR to RGB) have strides torch cannot wrap, and torch
    # warns on read-only arrays (np.frombuffer, decoded images).
    if not frame.flags['C_CONTIGUOUS'] or not frame.flags['WRITEABLE']:
        frame = np.array(frame, order='C')
    return frame


class FramePreprocessor:
    """A checkpoint's image processor, done on the model's device for uint8 RGB frames."""

    def __init__(self, image_processor, device, dtype):
        """Set up the fast path for ``image_processor``'s settings, where it covers them."""
        self.image_processor = image_processor
        self.device, self.dtype = device, dtype
        self.image_size = _fast_path_size(image_processor)
        self.fast = self.image_size is not None
        if not self.fast:
            LOGGER.warning('image processor settings not covered by the fast path; '
                           'using the checkpoint image processor')
            return
        self.resize_mode = RESAMPLE_MODES[int(getattr(image_processor, 'resample', 3))]
        # Rescale and normalise folded into one multiply-add per channel.
        scale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        mean = np.asarray(image_processor.image_mean if image_processor.do_normalize else 0.0)
        std = np.asarray(image_processor.image_std if image_processor.do_normalize else 1.0)
        gain = scale / std * np.ones(3)
        offset = -mean / std * np.ones(3)
        self._gain_array = gain.astype(np.float32).reshape(3, 1, 1)
        self._offset_array = offset.astype(np.float32).reshape(3, 1, 1)
        self._gain = torch.tensor(gain, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._offset = torch.tensor(offset, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, frames):
        """
        Turn HxWx3 uint8 RGB frames into the model's ``pixel_values`` on the model's device.

        Frames go to the device as uint8 (a quarter of the bytes of float32) and are resized
        there with antialiased interpolation, which is what PIL does inside the checkpoint's own
        image processor.
        """
        if not self.fast:
            inputs = self.image_processor(list(frames), return_tensors='pt')
            return inputs['pixel_values'].to(self.device, self.dtype)
        resized = []
        for frame in frames:
            image = torch.from_numpy(_as_rgb_array(frame)).to(self.device, non_blocking=True)
            image = image.permute(2, 0, 1).unsqueeze(0)
            if tuple(image.shape[-2:]) != self.image_size:
                image = resize_like_pil(image, self.image_size, self.resize_mode)
            resized.append(image)
        if self.device.type == 'cpu':
            return self._normalize_on_cpu(resized)
        batch = torch.cat([image.float() for image in resized])
        return (batch * self._gain + self._offset).to(self.dtype)

    def _normalize_on_cpu(self, images):
        # numpy, single-threaded: torch's two-thread kernels on tensors this small wait for a
        # time slice whenever other processes keep the cores busy (12 ms per operation
        # measured on a loaded 2-core machine, against 0.1 ms on one thread).
        batch = np.empty((len(images), 3) + self.image_size, np.float32)
        for index, image in enumerate(images):
            np.multiply(image[0].numpy(), self._gain_array, out=batch[index])
            np.add(batch[index], self._offset_array, out=batch[index])
        return torch.from_numpy(batch).to(self.dtype)
