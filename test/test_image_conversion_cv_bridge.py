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
Tests for the cv_bridge path of blip2_ros.image_conversion.

The last test compares ROS 2's own cv_bridge with the numpy path on every encoding and runs
where a ROS 2 install provides cv_bridge. The pip wheels have none, so the other tests check
the rules that choose between the two paths with a small ``cv_bridge`` package written into a
temporary ament prefix: which messages go to cv_bridge, that a cv_bridge outside the ROS
install is never imported, and that a cv_bridge failure never rejects a frame.
"""

import array
import sys
import textwrap

from blip2_ros import image_conversion
from blip2_ros.image_conversion import ImageConversionError
from blip2_ros.image_conversion import message_to_rgb
from blip2_ros.image_conversion import SUPPORTED_ENCODINGS
import numpy as np
import pytest
from rclpy.serialization import serialize_message
from rosbags.typesys import get_typestore
from rosbags.typesys import Stores
from sensor_msgs.msg import Image

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
RNG = np.random.default_rng(99)

# Bytes per pixel on the wire, for building valid messages of every encoding.
PIXEL_BYTES = {
    'rgb8': 3, 'bgr8': 3, '8uc3': 3, 'rgba8': 4, 'bgra8': 4, '8uc4': 4, 'mono8': 1, '8uc1': 1,
    'mono16': 2, '16uc1': 2, 'rgb16': 6, 'bgr16': 6, 'rgba16': 8, 'bgra16': 8,
    'bayer_rggb8': 1, 'bayer_bggr8': 1, 'bayer_gbrg8': 1, 'bayer_grbg8': 1,
    'yuv422': 2, 'uyvy': 2, 'yuv422_yuy2': 2, 'yuyv': 2,
}
# As ROS spells them: cv_bridge (and our cv_bridge rule) go by the exact string.
ROS_SPELLING = {'8uc1': '8UC1', '8uc3': '8UC3', '8uc4': '8UC4', '16uc1': '16UC1'}
# What cv_bridge cannot colour-convert (8UCx, 16UC1) or need not convert (rgb8).
NUMPY_ONLY = {'rgb8', '8UC1', '8UC3', '8UC4', '16UC1'}


def _image(encoding, width=6, height=4, padding_pixels=0, is_bigendian=0):
    pixel_bytes = PIXEL_BYTES[encoding.lower()]
    step = (width + padding_pixels) * pixel_bytes
    msg = Image()
    msg.width = width
    msg.height = height
    msg.encoding = encoding
    msg.step = step
    msg.is_bigendian = is_bigendian
    msg.data = array.array('B', RNG.integers(0, 256, size=step * height, dtype=np.uint8))
    return msg


def _via_rosbags(msg):
    """Serialize with rclpy, deserialize with rosbags: a message that never goes to cv_bridge."""
    return TYPESTORE.deserialize_cdr(serialize_message(msg), 'sensor_msgs/msg/Image')


def _numpy_path(msg):
    return message_to_rgb(_via_rosbags(msg))


def _all_encodings():
    return [ROS_SPELLING.get(name, name) for name in SUPPORTED_ENCODINGS]


STAND_IN = textwrap.dedent("""\
    calls = []
    answer = None


    class CvBridge:
        def imgmsg_to_cv2(self, img_msg, desired_encoding='passthrough'):
            calls.append((img_msg.encoding, desired_encoding))
            return answer(img_msg)
    """)


def _forget_cv_bridge():
    for name in [name for name in sys.modules if name.split('.')[0] == 'cv_bridge']:
        del sys.modules[name]
    image_conversion._ros_cv_bridge.cache_clear()


@pytest.fixture
def ros_prefix(tmp_path, monkeypatch):
    """
    Lay out a ROS-like install prefix on AMENT_PREFIX_PATH and return a helper.

    ``install(source, inside=True, registered=True)`` writes a ``cv_bridge`` package whose
    ``__init__.py`` is ``source``, inside the prefix (where apt or colcon put it) or in a
    separate site folder (where pip would), and registers ``cv_bridge`` in the ament index.
    """
    saved = {name: module for name, module in sys.modules.items()
             if name.split('.')[0] == 'cv_bridge'}
    _forget_cv_bridge()
    prefix = tmp_path / 'opt_ros'
    (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages').mkdir(parents=True)
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(prefix))

    def install(source, inside=True, registered=True):
        site = prefix / 'lib' / 'python3' / 'site-packages' if inside else tmp_path / 'pip_site'
        (site / 'cv_bridge').mkdir(parents=True)
        (site / 'cv_bridge' / '__init__.py').write_text(source)
        monkeypatch.syspath_prepend(str(site))
        if registered:
            (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' /
             'cv_bridge').write_text('')

    yield install
    _forget_cv_bridge()
    sys.modules.update(saved)


@pytest.fixture
def stand_in(ros_prefix):
    """Install the stand-in cv_bridge inside the ROS prefix and return its module."""
    ros_prefix(STAND_IN)
    assert image_conversion.cv_bridge_in_use()
    return sys.modules['cv_bridge']


def _marked_frame(msg):
    """Return a frame no real conversion produces, so the test sees which path answered."""
    return np.full((msg.height, msg.width, 3), 7, dtype=np.uint8)


def test_without_an_ament_index_cv_bridge_is_not_used(ros_prefix, monkeypatch):
    ros_prefix(STAND_IN)
    monkeypatch.delenv('AMENT_PREFIX_PATH')
    assert not image_conversion.cv_bridge_in_use()
    assert 'cv_bridge' not in sys.modules


def test_cv_bridge_missing_from_the_ament_index_is_never_imported(ros_prefix):
    # pip's cv-bridge on a machine without a ROS 2 cv_bridge: importable, but not ROS 2's.
    ros_prefix(STAND_IN, registered=False)
    assert not image_conversion.cv_bridge_in_use()
    assert 'cv_bridge' not in sys.modules


def test_cv_bridge_from_outside_the_ros_prefix_is_never_imported(ros_prefix):
    # The ROS install lists cv_bridge, but a pip package of that name shadows it.
    ros_prefix(STAND_IN, inside=False)
    assert not image_conversion.cv_bridge_in_use()
    assert 'cv_bridge' not in sys.modules
    msg = _image('bgr8')
    np.testing.assert_array_equal(message_to_rgb(msg), _numpy_path(msg))


def test_a_cv_bridge_that_fails_to_load_leaves_the_numpy_path(ros_prefix):
    ros_prefix('class CvBridge:\n    def __init__(self):\n        raise ImportError("boost")\n')
    assert not image_conversion.cv_bridge_in_use()
    msg = _image('mono16')
    np.testing.assert_array_equal(message_to_rgb(msg), _numpy_path(msg))


def test_the_doctor_names_why_the_installed_cv_bridge_does_not_load(ros_prefix):
    from blip2_ros import doctor
    # What a cv_bridge built for numpy 1.x says under numpy 2 (vision_opencv issue 535).
    ros_prefix('raise ImportError("numpy.core.multiarray failed to import")\n')
    assert not image_conversion.cv_bridge_in_use()
    assert str(image_conversion.cv_bridge_failure()) == 'numpy.core.multiarray failed to import'

    check = doctor.check_cv_bridge()

    assert check.status == doctor.WARN
    assert check.what.startswith('cv_bridge from the ROS 2 install does not load (numpy.core.')
    assert f'numpy {np.__version__} is first on the path' in check.fix
    assert 'pip uninstall numpy opencv-python-headless' in check.fix


def test_without_a_ros_cv_bridge_the_doctor_says_none_is_needed(ros_prefix):
    from blip2_ros import doctor
    ros_prefix(STAND_IN, registered=False)
    assert image_conversion.cv_bridge_failure() is None
    assert doctor.check_cv_bridge().what.startswith('no ROS 2 cv_bridge')


def test_rclpy_images_go_to_cv_bridge_except_where_it_differs(stand_in):
    stand_in.answer = _marked_frame
    for encoding in _all_encodings():
        stand_in.calls.clear()
        msg = _image(encoding)
        result = message_to_rgb(msg)
        if encoding in NUMPY_ONLY:
            assert stand_in.calls == [], encoding
            np.testing.assert_array_equal(result, _numpy_path(msg))
        else:
            assert stand_in.calls == [(encoding, 'rgb8')], encoding
            np.testing.assert_array_equal(result, _marked_frame(msg))


@pytest.mark.parametrize('description, msg', [
    ('rows padded by whole pixels', _image('bgr8', padding_pixels=2)),
    ('big-endian 16 bit', _image('mono16', is_bigendian=1)),
    ('big-endian flag on 8-bit data', _image('bgr8', is_bigendian=1)),
])
def test_layout_quirks_stay_on_the_numpy_path(stand_in, description, msg):
    stand_in.answer = _marked_frame
    result = message_to_rgb(msg)
    assert stand_in.calls == [], description
    np.testing.assert_array_equal(result, _numpy_path(msg))


def test_rows_padded_by_part_of_a_pixel_stay_on_the_numpy_path(stand_in):
    stand_in.answer = _marked_frame
    msg = _image('bgr8')
    msg.step = 6 * 3 + 5
    msg.data = array.array('B', RNG.integers(0, 256, size=msg.step * 4, dtype=np.uint8))
    result = message_to_rgb(msg)
    assert stand_in.calls == []
    expected = np.frombuffer(msg.data, np.uint8).reshape(4, -1)[:, :18].reshape(4, 6, 3)
    np.testing.assert_array_equal(result, expected[..., ::-1])


def test_rosbags_messages_never_go_to_cv_bridge(stand_in):
    stand_in.answer = _marked_frame
    rosbags_msg = _via_rosbags(_image('bgr8'))
    result = message_to_rgb(rosbags_msg)
    assert stand_in.calls == []
    expected = np.asarray(rosbags_msg.data).reshape(4, 6, 3)[..., ::-1]
    np.testing.assert_array_equal(result, expected)


def _raise_like_cv_bridge(msg):
    raise RuntimeError(f'[{msg.encoding}] conversion failed in cvtColor2')


@pytest.mark.parametrize('answer', [
    pytest.param(_raise_like_cv_bridge, id='raises'),
    pytest.param(lambda msg: np.zeros((msg.height, msg.width), np.uint8), id='wrong-shape'),
    pytest.param(lambda msg: np.zeros((msg.height, msg.width, 3), np.uint16), id='wrong-type'),
])
def test_a_cv_bridge_failure_rejects_nothing(stand_in, answer):
    stand_in.answer = answer
    msg = _image('bgra8')
    result = message_to_rgb(msg)
    assert stand_in.calls == [('bgra8', 'rgb8')]
    np.testing.assert_array_equal(result, _numpy_path(msg))


@pytest.mark.parametrize('change, reason', [
    (lambda msg: setattr(msg, 'step', 5), 'bad_step'),
    (lambda msg: setattr(msg, 'data', array.array('B', bytes(10))), 'bad_size'),
    (lambda msg: setattr(msg, 'width', 0), 'empty'),
    (lambda msg: setattr(msg, 'encoding', 'hsv8'), 'unknown_encoding'),
])
def test_validation_runs_before_cv_bridge(stand_in, change, reason):
    stand_in.answer = _marked_frame
    msg = _image('bgr8')
    change(msg)
    with pytest.raises(ImageConversionError) as caught:
        message_to_rgb(msg)
    assert caught.value.reason == reason
    with pytest.raises(ImageConversionError) as caught:
        message_to_rgb(_image('bgr8'), max_pixels=23)
    assert caught.value.reason == 'too_large'
    assert stand_in.calls == []


def test_ros_cv_bridge_agrees_with_the_numpy_path_on_every_encoding():
    pytest.importorskip(
        'cv_bridge', reason='ROS 2 cv_bridge comes with a ROS 2 install; the pip wheels have none')
    _forget_cv_bridge()
    if not image_conversion.cv_bridge_in_use():
        pytest.skip('the cv_bridge that imports is not ROS 2 cv_bridge from AMENT_PREFIX_PATH')
    from cv_bridge import CvBridge

    bridge = CvBridge()
    for encoding in _all_encodings():
        msg = _image(encoding, width=8, height=6)
        converted = message_to_rgb(msg)
        numpy_path = _numpy_path(msg)
        assert converted.shape == numpy_path.shape == (6, 8, 3), encoding
        # Bayer and YUV go through OpenCV's interpolation in both paths, but the ROS
        # install's OpenCV build may round one level differently from opencv-python's.
        tolerance = 1 if encoding.startswith(('bayer', 'yuv', 'uyvy')) else 0
        difference = np.abs(converted.astype(int) - numpy_path.astype(int)).max()
        assert difference <= tolerance, encoding
        if encoding not in NUMPY_ONLY:
            direct = bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')
            np.testing.assert_array_equal(converted, direct, err_msg=encoding)
