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
Turn sensor_msgs Image and CompressedImage messages into HxWx3 uint8 RGB numpy arrays.

The functions are duck-typed: they read only the message fields, so they accept rclpy
messages (``data`` is an ``array.array`` or ``bytes``) and messages deserialized by the
``rosbags`` library (``data`` is a numpy uint8 array) alike. Nothing here imports rclpy.

Raw images are wrapped with ``np.frombuffer`` (no copy); an unpadded ``rgb8`` image is
returned as a view of the message buffer (read-only when that buffer is, as with rosbags
messages), so copy the result before changing it in place or keeping it longer than the
message. Every other encoding produces a fresh array.

Where the ROS 2 distribution provides cv_bridge, raw rclpy ``sensor_msgs/Image`` messages
are converted with ``CvBridge().imgmsg_to_cv2(msg, desired_encoding='rgb8')``, after the same
validation (so a bad frame fails with the same ``reason`` either way). cv_bridge counts as
provided only when the ament index (``AMENT_PREFIX_PATH``) lists a ``cv_bridge`` package and
the ``cv_bridge`` module Python would import lives under that package's prefix; any other
(such as the PyPI package named ``cv-bridge``, a ROS 1 port that breaks on numpy 2) is never
imported. The numpy path below converts everything else:

* messages deserialized by ``rosbags`` (the bag converter never uses cv_bridge);
* ``rgb8`` already is the target encoding (it stays a zero-copy view);
* ``8UC1``/``8UC3``/``8UC4`` and ``16UC1``, which cv_bridge refuses to colour-convert (and
  ``16UC1`` is min-max stretched here, see below);
* big-endian messages (cv_bridge byte-swaps with ``ndarray.newbyteorder``, gone in numpy 2)
  and padded rows (older cv_bridge ignores ``step``, newer rounds it down to whole pixels);
* any frame that cv_bridge fails to convert: its failure rejects nothing.

Encodings are matched as ROS spells them (``rgb8``, ``16UC1``): they are case-sensitive, and
cv_bridge refuses ``RGB8``, so it is refused here too, with the right spelling in the message.

YUV 4:2:2 is converted with BT.601 video-range coefficients (OpenCV's, as cv_bridge uses).

16-bit images become 8 bit in one of two ways, chosen by what the encoding means:

* ``mono16`` (and 16-bit colour) is an intensity image: ``value * 255 / 65535``, rounded,
  the fixed scale cv_bridge uses, so brightness means the same in every frame.
* ``16UC1`` is a depth image in millimetres that rarely uses more than a few per cent of the
  16-bit range; a fixed scale would give a black picture. It is min-max stretched per frame
  to 0..255 (a constant frame becomes all zeros).

Compressed images are JPEG or PNG, told apart by their data's signature, not by the ``format``
label: cv_bridge decodes them that way, CompressedImage.msg reads a label it does not recognise
as JPEG, and cv_bridge itself labels a JPEG ``jpe``. The label counts only where the data cannot
tell: the source encoding of a 16-bit PNG, a Bayer mosaic, and compressedDepth's header. A label
that names another codec than the data's is decoded all the same and listed, once, by
``format_label_mismatches()``. Their header is read first (with Pillow, which decodes
nothing), so ``max_pixels`` rejects a decompression bomb before any pixel is decoded.
``compressedDepth`` payloads (a 12-byte configuration header followed by a PNG of the raw
16UC1 depth) are decoded by skipping that header; 32FC1 (inverse depth) and RVL payloads
are rejected as unsupported. A Bayer mosaic that image_transport compressed as is (PNG, or JPEG
with ``jpeg_compress_bayer``; format ``'bayer_rggb8; png compressed '``) is demosaiced like a
raw frame.
"""

import functools
import importlib.util
import io
import os
import threading
import warnings

import cv2
import numpy as np
from PIL import Image

__all__ = [
    'ImageConversionError',
    'SUPPORTED_ENCODINGS',
    'compressed_to_rgb',
    'cv_bridge_failure',
    'cv_bridge_in_use',
    'format_label_mismatches',
    'image_to_rgb',
    'message_to_rgb',
]

# Size of the ConfigHeader (int32 format + two float32 depth parameters) that
# image_transport's compressed_depth plugin puts before the PNG.
_COMPRESSED_DEPTH_HEADER_BYTES = 12

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_JPEG_MAGIC = b'\xff\xd8'
_JPEG_END = b'\xff\xd9'
_JPEG_END_SEARCH_BYTES = 1024
# cv_bridge's cv2_to_compressed_imgmsg(img, 'jpe') labels a JPEG 'jpe', OpenCV's extension.
_JPEG_LABELS = ('jpeg', 'jpg', 'jpe')

# Format labels that named another codec than their data's, with the line that says so.
# Bounded: a publisher could put a counter into its label.
_MAX_LABEL_MISMATCHES = 16
_label_mismatches = {}
_label_mismatches_lock = threading.Lock()

# libjpeg decodes at 1/2, 1/4 and 1/8 scale by truncating the DCT: fewer samples to
# reconstruct, colour-convert and copy, and each output pixel is the average of its block.
_REDUCED_JPEG_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                       (2, cv2.IMREAD_REDUCED_COLOR_2))

_FIXED_SCALE = 'fixed'
_MINMAX_SCALE = 'minmax'


class ImageConversionError(ValueError):
    """An image message cannot be turned into an RGB array; ``reason`` is a short key."""

    def __init__(self, reason, message):
        """Store the machine-readable ``reason`` next to the one-line ``message``."""
        super().__init__(message)
        self.reason = reason


class _Layout:
    """How one raw encoding is laid out in memory and turned into RGB."""

    __slots__ = ('channels', 'bytes_per_channel', 'color_code', 'scale')

    def __init__(self, channels, bytes_per_channel=1, color_code=None, scale=None):
        self.channels = channels
        self.bytes_per_channel = bytes_per_channel
        self.color_code = color_code
        self.scale = scale


_BGR = _Layout(3, color_code=cv2.COLOR_BGR2RGB)
_BGRA = _Layout(4, color_code=cv2.COLOR_BGRA2RGB)
_MONO8 = _Layout(1, color_code=cv2.COLOR_GRAY2RGB)
_UYVY = _Layout(2, color_code=cv2.COLOR_YUV2RGB_UYVY)
_YUYV = _Layout(2, color_code=cv2.COLOR_YUV2RGB_YUY2)

# OpenCV names a Bayer pattern after the second row's first two pixels, one row
# down from ROS's name, hence rggb -> BayerBG (the mapping cv_bridge uses).
_BAYER_TO_RGB = {
    'bayer_rggb': cv2.COLOR_BayerBG2RGB,
    'bayer_bggr': cv2.COLOR_BayerRG2RGB,
    'bayer_gbrg': cv2.COLOR_BayerGR2RGB,
    'bayer_grbg': cv2.COLOR_BayerGB2RGB,
}

# Keys are spelled as ROS spells them: encodings are case-sensitive ('16UC1', but 'rgb8').
_LAYOUTS = {
    'rgb8': _Layout(3),
    'bgr8': _BGR,
    '8UC3': _BGR,
    'rgba8': _Layout(4, color_code=cv2.COLOR_RGBA2RGB),
    'bgra8': _BGRA,
    '8UC4': _BGRA,
    'mono8': _MONO8,
    '8UC1': _MONO8,
    'mono16': _Layout(1, 2, cv2.COLOR_GRAY2RGB, _FIXED_SCALE),
    '16UC1': _Layout(1, 2, cv2.COLOR_GRAY2RGB, _MINMAX_SCALE),
    'rgb16': _Layout(3, 2, None, _FIXED_SCALE),
    'bgr16': _Layout(3, 2, cv2.COLOR_BGR2RGB, _FIXED_SCALE),
    'rgba16': _Layout(4, 2, cv2.COLOR_RGBA2RGB, _FIXED_SCALE),
    'bgra16': _Layout(4, 2, cv2.COLOR_BGRA2RGB, _FIXED_SCALE),
    **{f'{pattern}8': _Layout(1, color_code=code) for pattern, code in _BAYER_TO_RGB.items()},
    'yuv422': _UYVY,
    'uyvy': _UYVY,
    'yuv422_yuy2': _YUYV,
    'yuyv': _YUYV,
}

SUPPORTED_ENCODINGS = tuple(sorted(_LAYOUTS))
# 'RGB8' or ' mono8' name a supported encoding in another spelling, which cv_bridge refuses.
_ROS_SPELLINGS = {encoding.lower(): encoding for encoding in _LAYOUTS}

# Encodings for which cv_bridge's conversion to rgb8 means the same as ours (same OpenCV
# colour codes, same fixed 16-to-8-bit scale). Spelled as ROS spells them.
_CV_BRIDGE_ENCODINGS = frozenset([
    'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', 'rgb16', 'bgr16', 'rgba16', 'bgra16',
    'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8',
    'yuv422', 'uyvy', 'yuv422_yuy2', 'yuyv',
])


def message_to_rgb(msg, max_pixels=None, min_size=None):
    """
    Convert a sensor_msgs Image or CompressedImage message to an HxWx3 uint8 RGB array.

    Raises ImageConversionError (with ``.reason``) when the message cannot be converted.
    ``max_pixels`` bounds width * height; larger images raise with reason 'too_large'.
    ``min_size`` is the (height, width) the caller will shrink the image to, if it will: a JPEG
    at least four times that size both ways is then decoded at 1/2, 1/4 or 1/8 scale, never
    below twice ``min_size``, which takes a fraction of the full decode (1920x1080 for a 224 px
    model: half scale, about a third of the time). Other images come at full size.
    """
    if hasattr(msg, 'encoding'):
        return image_to_rgb(msg, max_pixels)
    if hasattr(msg, 'format'):
        return compressed_to_rgb(msg, max_pixels, min_size)
    raise ImageConversionError(
        'not_an_image',
        f'{type(msg).__name__} is not an image message: pass a sensor_msgs Image or '
        'CompressedImage')


def image_to_rgb(msg, max_pixels=None):
    """Convert a raw sensor_msgs Image to an HxWx3 uint8 RGB array."""
    width = int(msg.width)
    height = int(msg.height)
    step = int(msg.step)
    encoding = str(msg.encoding)
    data = _as_bytes_array(msg.data)

    if width <= 0 or height <= 0 or data.size == 0:
        raise ImageConversionError(
            'empty', f'image is empty ({width}x{height}, {data.size} bytes of data)')
    layout = _LAYOUTS.get(encoding)
    if layout is None:
        raise ImageConversionError('unknown_encoding', _unknown_encoding_message(encoding))
    _check_pixels(width, height, max_pixels)

    row_bytes = width * layout.channels * layout.bytes_per_channel
    if step < row_bytes:
        raise ImageConversionError(
            'bad_step',
            f'step {step} is smaller than one row of {width} {encoding} pixels '
            f'({row_bytes} bytes)')
    if data.size != step * height:
        raise ImageConversionError(
            'bad_size',
            f'data holds {data.size} bytes, but step {step} x height {height} '
            f'needs {step * height}')
    if layout.channels == 2 and width % 2:
        raise ImageConversionError(
            'bad_size', f'{encoding} packs two pixels per sample, but the width {width} is odd')

    if (encoding in _CV_BRIDGE_ENCODINGS and not msg.is_bigendian and step == row_bytes
            and _is_rclpy_image(msg)):
        converted = _convert_with_cv_bridge(msg, height, width)
        if converted is not None:
            return converted

    rows = data.reshape(height, step)[:, :row_bytes]
    if layout.bytes_per_channel == 2:
        pixels = rows.view('>u2' if msg.is_bigendian else '<u2')
        pixels = _to_8bit(pixels, layout.scale)
    else:
        # Bytes are bytes: is_bigendian means nothing for 8-bit data (Spot sets it to 1).
        pixels = rows
    if layout.channels > 1:
        pixels = pixels.reshape(height, width, layout.channels)
    else:
        pixels = pixels.reshape(height, width)

    if layout.color_code is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(pixels, layout.color_code)


def compressed_to_rgb(msg, max_pixels=None, min_size=None):
    """
    Convert a sensor_msgs CompressedImage (JPEG, PNG or 16UC1 compressedDepth) to RGB.

    ``min_size``: see message_to_rgb.
    """
    fmt = str(msg.format)
    data = _as_bytes_array(msg.data)
    if data.size == 0:
        raise ImageConversionError('empty', f"compressed image '{fmt}' has no data")

    lowered = fmt.lower()
    source_encoding = lowered.split(';', 1)[0].strip() if ';' in lowered else ''
    if 'compresseddepth' in lowered:
        # Only the label tells that a 12-byte header comes before the PNG.
        if source_encoding != '16uc1' or 'rvl' in lowered:
            raise ImageConversionError(
                'unknown_encoding',
                f"compressedDepth format '{fmt}' is not supported; only 16UC1 PNG depth is")
        data = data[_COMPRESSED_DEPTH_HEADER_BYTES:]

    head = data[:8].tobytes()
    payload = _payload_kind(head)
    codec = _label_codec(lowered)
    if payload is None:
        if codec not in ('', 'jpeg', 'png'):
            raise ImageConversionError(
                'unknown_encoding',
                f"unsupported compressed format '{fmt}'; only JPEG and PNG can be decoded")
        raise ImageConversionError(
            'undecodable', f"compressed image '{fmt}' is neither a JPEG nor a PNG stream")
    if codec not in ('', payload):
        _note_label_mismatch(fmt, payload)
    if head.startswith(_JPEG_MAGIC) and _JPEG_END not in _jpeg_tail(data):
        # OpenCV 5 refuses such a frame itself; earlier releases, as ROS distributions ship,
        # would decode it into a partly grey picture and the node would caption that.
        raise ImageConversionError(
            'undecodable',
            f"compressed image '{fmt}' is truncated: no JPEG end marker ({data.size} bytes)")
    width, height = _compressed_size(data, fmt)
    _check_pixels(width, height, max_pixels)

    bayer_code = _stored_bayer_code(lowered, source_encoding)
    if bayer_code is not None:
        # A reduced-scale decode would average the mosaic's colours together.
        min_size = None
    decoded = cv2.imdecode(data, _decode_flags(head, width, height, min_size))
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(
            'undecodable', f"compressed image '{fmt}' is truncated or corrupt ({data.size} bytes)")
    if decoded.dtype == np.uint16:
        scale = _MINMAX_SCALE if source_encoding == '16uc1' else _FIXED_SCALE
        decoded = _to_8bit(decoded, scale)
    elif decoded.dtype != np.uint8:
        raise ImageConversionError(
            'undecodable', f"compressed image '{fmt}' decodes to unsupported type {decoded.dtype}")

    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if channels == 1:
        to_rgb = cv2.COLOR_GRAY2RGB if bayer_code is None else bayer_code
        return cv2.cvtColor(decoded.reshape(decoded.shape[:2]), to_rgb)
    if channels == 3:
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    raise ImageConversionError(
        'undecodable', f"compressed image '{fmt}' decodes to {channels} channels")


def format_label_mismatches():
    """
    Return one line per CompressedImage format label that contradicted its data, first first.

    Frames are decoded by their data's signature (JPEG or PNG), whatever the label says, as
    cv_bridge decodes them; a publisher whose label names another codec is worth a word to its
    owner, once. Each distinct (label, data) pair is listed once; at most 16 are kept.
    """
    with _label_mismatches_lock:
        return list(_label_mismatches.values())


def cv_bridge_in_use():
    """Return True when raw rclpy Image messages are converted with ROS 2's cv_bridge."""
    return _ros_cv_bridge()[0] is not None


def cv_bridge_failure():
    """Return the error the ROS 2 install's cv_bridge fails to load with, or None."""
    return _ros_cv_bridge()[1]


@functools.lru_cache(maxsize=None)
def _ros_cv_bridge():
    """Return (a CvBridge from the ROS 2 install or None, the error loading it or None)."""
    try:
        from ament_index_python.packages import get_package_prefix
        prefix = os.path.abspath(get_package_prefix('cv_bridge'))
        spec = importlib.util.find_spec('cv_bridge')
    except (ImportError, LookupError, OSError, ValueError):
        return None, None
    # Located before it is imported, so a cv_bridge from elsewhere (PyPI's ROS 1 port) never
    # runs. abspath, not resolve: a colcon --symlink-install links out of the prefix.
    origin = os.path.abspath(spec.origin) if spec is not None and spec.origin else ''
    if not origin or os.path.commonpath([origin, prefix]) != prefix:
        return None, None
    try:
        from cv_bridge import CvBridge
        return CvBridge(), None
    except Exception as error:
        # A half-installed cv_bridge fails in many ways; none of them is fatal here, the
        # numpy path converts the frames.
        return None, error


def _unknown_encoding_message(encoding):
    ros_spelling = _ROS_SPELLINGS.get(encoding.strip().lower())
    if ros_spelling is not None:
        return (f"encoding '{encoding}' is not a ROS encoding; did you mean '{ros_spelling}'? "
                '(encodings are case-sensitive; cv_bridge refuses it too)')
    return (f"unsupported image encoding '{encoding}'; "
            f"supported: {', '.join(SUPPORTED_ENCODINGS)}")


def _is_rclpy_image(msg):
    message_type = type(msg)
    return message_type.__name__ == 'Image' and message_type.__module__.startswith(
        'sensor_msgs.msg')


def _convert_with_cv_bridge(msg, height, width):
    """Return cv_bridge's rgb8 conversion, or None to leave the frame to the numpy path."""
    bridge, _ = _ros_cv_bridge()
    if bridge is None:
        return None
    try:
        converted = bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
    except Exception:
        # The frame passed our validation, so a cv_bridge failure is cv_bridge's to own.
        return None
    if (not isinstance(converted, np.ndarray) or converted.dtype != np.uint8
            or converted.shape != (height, width, 3)):
        return None
    return np.ascontiguousarray(converted)


def _as_bytes_array(data):
    """Wrap a message's data field in a flat uint8 array, without copying when possible."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = data.view(np.uint8) if data.flags.c_contiguous else data.astype(np.uint8)
        return data.reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        # A plain list of ints, which rclpy messages also accept.
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _stored_bayer_code(lowered_format, source_encoding):
    """Return the demosaicing code when the compressed stream holds a raw Bayer mosaic."""
    pattern = source_encoding.rstrip('0123456789')
    code = _BAYER_TO_RGB.get(pattern)
    if code is None or source_encoding[len(pattern):] not in ('8', '16'):
        return None
    # image_transport names what it compressed after 'compressed': nothing or the Bayer
    # encoding itself for a mosaic, 'mono8' when it debayered to grey first.
    stored = lowered_format.partition('compressed')[2].strip()
    return code if stored in ('', source_encoding) else None


def _payload_kind(head):
    """Return 'jpeg' or 'png' by the stream's signature, or None for anything else."""
    if head.startswith(_JPEG_MAGIC):
        return 'jpeg'
    if head.startswith(_PNG_MAGIC):
        return 'png'
    return None


def _label_codec(lowered_format):
    """
    Return the codec a format label names: 'jpeg', 'png', another codec's name, or ''.

    '' where the label names none: empty, only a pixel format ('bgr8'), or compressedDepth.
    """
    if 'compresseddepth' in lowered_format:
        return ''
    # 'rgb8; jpeg compressed bgr8' names it after the ';', a bare 'jpe' or 'png' by itself.
    label = lowered_format.partition(';')[2] if ';' in lowered_format else lowered_format
    words = label.replace('compressed', ' ').split()
    if not words or words[0] in _ROS_SPELLINGS:
        return ''
    codec = words[0].rpartition('/')[2].lstrip('.')  # also 'image/jpeg', '.png'
    return 'jpeg' if codec in _JPEG_LABELS else codec


def _note_label_mismatch(fmt, payload):
    with _label_mismatches_lock:
        if (fmt, payload) not in _label_mismatches and (
                len(_label_mismatches) < _MAX_LABEL_MISMATCHES):
            _label_mismatches[(fmt, payload)] = (
                f"compressed format '{fmt}' does not name the {payload.upper()} data its "
                f'frames hold; they are decoded as {payload.upper()}')


def _jpeg_tail(data):
    """Return the last bytes of a JPEG stream, where its end marker is, past any zero padding."""
    # Cameras pad frames with zeros, and some write a few bytes after the marker.
    return data.tobytes().rstrip(b'\x00')[-_JPEG_END_SEARCH_BYTES:]


def _check_pixels(width, height, max_pixels):
    if max_pixels is not None and width * height > max_pixels:
        raise ImageConversionError(
            'too_large',
            f'image is {width}x{height} = {width * height} pixels, above the limit of '
            f'{max_pixels}; raise max_pixels if this size is expected')


def _compressed_size(data, fmt):
    """Read width and height from the JPEG/PNG header without decoding pixels."""
    try:
        with warnings.catch_warnings():
            # A huge header is answered by max_pixels (or the error below), not a warning.
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                return header.size
    except Image.DecompressionBombError as error:
        raise ImageConversionError(
            'too_large', f"compressed image '{fmt}' is too large to decode safely: {error}")
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageConversionError(
            'undecodable', f"compressed image '{fmt}' has an unreadable header: {error}")


def _decode_flags(head, width, height, min_size):
    """Full decode, as stored; or a reduced-scale colour decode of a JPEG large enough."""
    if min_size is not None and head.startswith(_JPEG_MAGIC):
        for factor, flag in _REDUCED_JPEG_FLAGS:
            # Never below twice min_size: the caller's antialiased resize still halves the
            # image or more, so the result stays close to resizing the full decode.
            if height // factor >= 2 * min_size[0] and width // factor >= 2 * min_size[1]:
                # IMREAD_UNCHANGED ignores EXIF orientation too; both decodes must agree.
                return flag | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.IMREAD_UNCHANGED


def _to_8bit(pixels, scale):
    """Map native or byte-swapped uint16 pixels to uint8 by the encoding's rule."""
    # OpenCV needs native byte order; padded rows are compacted here too.
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    if scale == _MINMAX_SCALE:
        return cv2.normalize(pixels, None, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_8U)
    return cv2.convertScaleAbs(pixels, alpha=255.0 / 65535.0)
