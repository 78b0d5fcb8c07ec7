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
A synthetic factory: conveyor scenes drawn with OpenCV, each with its true caption.

A scene holds one to three items of one kind and one colour on a conveyor belt, below a robot
arm. Count, colour and kind are drawn independently and uniformly, so the caption ('two red
boxes on the conveyor') depends on three things in the picture and guessing scores
``1 / spec.num_captions``. Positions, sizes, the belt's phase, the arm's pose, lighting and
sensor noise vary too but never change the caption.

Scenes are deterministic: :func:`scene_at` with the same seed and index gives the same picture.
Every random draw except the pixel noise goes into a resolution-free :class:`Layout` first, so
the same seed and index give the same caption and the same arrangement at 64x64, 640x480 or
1920x1080. Frames under 256 px on a side are drawn larger and reduced with area averaging, so
the kinds keep their shapes at 64x64: bottles stand tall, bolts lie long, boxes are square and
gears are toothed rings.
"""

from dataclasses import dataclass
import math

import cv2
import numpy as np

COUNT_WORDS = {1: 'one', 2: 'two', 3: 'three'}
# RGB reference colours; the arm, belt and walls are grey, so only items carry saturated colour.
COLOURS = {
    'red': (205, 38, 38),
    'green': (40, 165, 60),
    'blue': (40, 85, 215),
    'yellow': (230, 200, 35),
}
PLURALS = {'box': 'boxes', 'gear': 'gears', 'bottle': 'bottles', 'bolt': 'bolts'}
KINDS = tuple(PLURALS)
CAPTION_SUFFIX = 'on the conveyor'
SLOTS = 3
# Below this many pixels on the short side, draw larger and reduce with area averaging.
MIN_DRAW_SIDE = 256
# Sensor noise: uniform in -NOISE_OFFSET .. 15 - NOISE_OFFSET grey levels per channel.
NOISE_OFFSET = 7

_BELT_TOP, _BELT_BOTTOM = 0.44, 0.92
_BELT_LEFT, _BELT_RIGHT = 0.05, 0.95
_WALL_TOP, _WALL_BOTTOM = (178, 181, 186), (138, 141, 146)
_FLOOR = (96, 96, 100)
_BELT = (60, 62, 66)
_RAIL = (122, 126, 132)
_ARM = (206, 209, 214)
_JOINT = (72, 74, 78)


class SceneSpecError(ValueError):
    """A scene specification with an unknown or empty attribute; the message is one line."""


def parse_size(text):
    """Turn 'WIDTHxHEIGHT' (e.g. '640x480') into ``(height, width)``; raise ValueError if bad."""
    parts = str(text).lower().split('x')
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"size '{text}' is not WIDTHxHEIGHT, e.g. 64x64 or 640x480")
    width, height = (int(part) for part in parts)
    check_size((height, width))
    return height, width


def check_size(size):
    """Return ``size`` as ``(height, width)`` ints; raise ValueError if a side is under 16 px."""
    height, width = (int(side) for side in size)
    if height < 16 or width < 16:
        raise ValueError(f'frame size {width}x{height} is too small: both sides need 16 px+')
    return height, width


def plural(kind, count):
    """Return the kind's word for ``count`` items ('box' or 'boxes')."""
    return kind if count == 1 else PLURALS[kind]


def caption_for(count, colour, kind):
    """Return the caption of ``count`` items of one colour and kind: 'two red boxes on ...'."""
    return f'{COUNT_WORDS[count]} {colour} {plural(kind, count)} {CAPTION_SUFFIX}'


@dataclass(frozen=True)
class SceneSpec:
    """Which counts, colours and kinds scenes draw from (uniformly and independently)."""

    counts: tuple = (1, 2, 3)
    colours: tuple = tuple(COLOURS)
    kinds: tuple = KINDS

    def __post_init__(self):
        """Reject unknown or empty attribute lists with a message that lists what is allowed."""
        for name, values, allowed in (('counts', self.counts, COUNT_WORDS),
                                      ('colours', self.colours, COLOURS),
                                      ('kinds', self.kinds, PLURALS)):
            values = tuple(values)
            object.__setattr__(self, name, values)
            unknown = [value for value in values if value not in allowed]
            if not values or unknown or len(set(values)) != len(values):
                raise SceneSpecError(
                    f'{name} {list(values)} must be distinct values from '
                    f'{", ".join(str(value) for value in allowed)}')

    @property
    def num_captions(self):
        """Return how many distinct captions scenes can have."""
        return len(self.counts) * len(self.colours) * len(self.kinds)

    @property
    def chance_level(self):
        """Return the exact-match rate of always guessing one caption."""
        return 1.0 / self.num_captions

    def captions(self):
        """Return every caption scenes of this spec can have, sorted."""
        return tuple(sorted(caption_for(count, colour, kind) for count in self.counts
                            for colour in self.colours for kind in self.kinds))

    def vocabulary(self):
        """Return every word captions of this spec can use, sorted."""
        words = set()
        for caption in self.captions():
            words.update(caption.split())
        return tuple(sorted(words))


DEFAULT_SPEC = SceneSpec()


@dataclass(frozen=True)
class Item:
    """
    One item on the belt, independent of resolution.

    ``slot`` is its third of the belt; ``offset_x`` and ``offset_y`` (-1..1) say where it sits
    within the room its slot leaves; ``scale`` multiplies the base item size.
    """

    slot: int
    offset_x: float
    offset_y: float
    scale: float
    rgb: tuple
    angle: float
    flip: bool


@dataclass(frozen=True)
class Layout:
    """Everything random about a scene except the pixel noise; independent of resolution."""

    count: int
    colour: str
    kind: str
    items: tuple
    belt_phase: float
    arm_side: int
    arm_angles: tuple
    brightness: float


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered frame with its true caption and what it shows (compared by identity)."""

    image: np.ndarray
    caption: str
    layout: Layout
    boxes: tuple

    @property
    def attributes(self):
        """Return the caption's ingredients: ``{'count', 'colour', 'kind'}``."""
        return {'count': self.layout.count, 'colour': self.layout.colour,
                'kind': self.layout.kind}


def _extent(kind, size):
    """Return the (width, height) in pixels that an item of ``kind`` and ``size`` px covers."""
    if kind == 'bottle':
        return 0.64 * size, 1.24 * size
    if kind == 'bolt':
        return 1.12 * size, 0.56 * size
    if kind == 'gear':
        return 1.04 * size, 1.04 * size
    return 1.08 * size, 1.08 * size  # a square of 0.86 turned by up to 8.4 degrees


def _geometry(height, width):
    """Return belt top/bottom (px), slot width (px) and the base item size (px)."""
    belt_top, belt_bottom = _BELT_TOP * height, _BELT_BOTTOM * height
    slot_width = (_BELT_RIGHT - _BELT_LEFT) * width / SLOTS
    base_size = min(0.76 * slot_width, 0.56 * (belt_bottom - belt_top))
    return belt_top, belt_bottom, slot_width, base_size


def item_placement(item, kind, height, width):
    """
    Return an item's centre (x, y) and size in pixels of a ``height`` x ``width`` frame.

    Each item stays inside its own third of the belt, so items never touch.
    """
    belt_top, belt_bottom, slot_width, base_size = _geometry(height, width)
    size = base_size * item.scale
    extent_x, extent_y = _extent(kind, size)
    slot_centre = _BELT_LEFT * width + (item.slot + 0.5) * slot_width
    slack_x = max(0.0, (slot_width - extent_x) / 2 - 0.03 * slot_width)
    slack_y = max(0.0, (belt_bottom - belt_top - extent_y) / 2 - 0.04 * height)
    return (slot_centre + item.offset_x * slack_x,
            (belt_top + belt_bottom) / 2 + item.offset_y * slack_y, size)


def make_layout(rng, spec=DEFAULT_SPEC):
    """Draw a scene's layout from ``rng``: the same draws whatever size it is rendered at."""
    count = int(spec.counts[rng.integers(len(spec.counts))])
    colour = spec.colours[rng.integers(len(spec.colours))]
    kind = spec.kinds[rng.integers(len(spec.kinds))]
    slots = sorted(rng.choice(SLOTS, size=count, replace=False).tolist())
    items = []
    for slot in slots:
        jitter = rng.integers(-14, 15, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        items.append(Item(
            slot=int(slot), offset_x=float(rng.uniform(-1, 1)),
            offset_y=float(rng.uniform(-1, 1)), scale=float(rng.uniform(0.9, 1.1)), rgb=rgb,
            angle=float(rng.uniform(-12.0, 12.0)), flip=bool(rng.integers(2))))
    return Layout(
        count=count, colour=colour, kind=kind, items=tuple(items),
        belt_phase=float(rng.uniform()), arm_side=int(rng.integers(2)),
        arm_angles=(float(rng.uniform(20.0, 70.0)), float(rng.uniform(-40.0, 40.0))),
        brightness=float(rng.uniform(0.85, 1.12)))


def _shade(rgb, factor, lift=0):
    return tuple(int(np.clip(c * factor + lift, 0, 255)) for c in rgb)


def _poly(points, centre, angle_deg, scale):
    """Rotate ``points`` (item units) by ``angle_deg``, scale, and move to ``centre``."""
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    pts = np.asarray(points, dtype=np.float64) * scale
    rotated = np.stack([pts[:, 0] * cos - pts[:, 1] * sin, pts[:, 0] * sin + pts[:, 1] * cos], 1)
    return np.round(rotated + np.asarray(centre)).astype(np.int32)


def _rect(width, height, x=0.0, y=0.0):
    return [(x - width / 2, y - height / 2), (x + width / 2, y - height / 2),
            (x + width / 2, y + height / 2), (x - width / 2, y + height / 2)]


def _draw_box(canvas, centre, size, rgb, item, belt):
    del belt
    angle = item.angle * 0.7
    side = 0.86
    cv2.fillPoly(canvas, [_poly(_rect(side, side), centre, angle, size)], rgb, cv2.LINE_AA)
    # Packing tape across the lid and a darker edge make it read as a carton, not a tile.
    cv2.fillPoly(canvas, [_poly(_rect(side, 0.14), centre, angle, size)],
                 _shade(rgb, 0.72), cv2.LINE_AA)
    cv2.polylines(canvas, [_poly(_rect(side, side), centre, angle, size)], True,
                  _shade(rgb, 0.55), max(1, round(0.06 * size)), cv2.LINE_AA)


def _draw_gear(canvas, centre, size, rgb, item, belt):
    angle = item.angle
    teeth = 8
    tooth = _rect(0.17, 0.22, 0.0, -0.39)
    for index in range(teeth):
        cv2.fillPoly(canvas, [_poly(tooth, centre, angle + index * 360.0 / teeth, size)], rgb,
                     cv2.LINE_AA)
    centre_px = tuple(int(round(c)) for c in centre)
    cv2.circle(canvas, centre_px, int(round(0.32 * size)), rgb, -1, cv2.LINE_AA)
    cv2.circle(canvas, centre_px, int(round(0.32 * size)), _shade(rgb, 0.6),
               max(1, round(0.04 * size)), cv2.LINE_AA)
    # The hole shows the belt through the gear: the clearest sign of a gear at 64x64.
    cv2.circle(canvas, centre_px, int(round(0.15 * size)), belt, -1, cv2.LINE_AA)


def _draw_bottle(canvas, centre, size, rgb, item, belt):
    del belt
    tilt = item.angle * 0.25
    body = _rect(0.52, 0.78, 0.0, 0.2)
    cv2.fillPoly(canvas, [_poly(body, centre, tilt, size)], rgb, cv2.LINE_AA)
    shoulder_centre = _poly([(0.0, -0.19)], centre, tilt, size)[0]
    cv2.ellipse(canvas, tuple(int(v) for v in shoulder_centre),
                (int(round(0.26 * size)), int(round(0.16 * size))), tilt, 180, 360, rgb, -1,
                cv2.LINE_AA)
    cv2.fillPoly(canvas, [_poly(_rect(0.2, 0.26, 0.0, -0.4), centre, tilt, size)], rgb,
                 cv2.LINE_AA)
    cv2.fillPoly(canvas, [_poly(_rect(0.26, 0.1, 0.0, -0.54), centre, tilt, size)],
                 _shade(rgb, 0.55), cv2.LINE_AA)
    cv2.fillPoly(canvas, [_poly(_rect(0.08, 0.6, -0.15, 0.2), centre, tilt, size)],
                 _shade(rgb, 1.0, 45), cv2.LINE_AA)


def _draw_bolt(canvas, centre, size, rgb, item, belt):
    del belt
    sign = -1.0 if item.flip else 1.0
    tilt = item.angle * 0.3
    head_x = -0.36 * sign
    hexagon = [(head_x + 0.2 * math.cos(math.radians(60 * k + 30)),
                0.23 * math.sin(math.radians(60 * k + 30))) for k in range(6)]
    cv2.fillPoly(canvas, [_poly(_rect(0.7, 0.17, 0.15 * sign), centre, tilt, size)], rgb,
                 cv2.LINE_AA)
    for step in range(5):
        x = (0.0 + 0.09 * step) * sign
        cv2.polylines(canvas, [_poly([(x, -0.085), (x + 0.04 * sign, 0.085)], centre, tilt,
                                     size)], False, _shade(rgb, 0.6),
                      max(1, round(0.025 * size)), cv2.LINE_AA)
    cv2.fillPoly(canvas, [_poly(hexagon, centre, tilt, size)], _shade(rgb, 0.85), cv2.LINE_AA)


_DRAWERS = {'box': _draw_box, 'gear': _draw_gear, 'bottle': _draw_bottle, 'bolt': _draw_bolt}


def _draw_background(canvas, layout, height, width):
    bright = layout.brightness
    belt_top, belt_bottom = int(_BELT_TOP * height), int(_BELT_BOTTOM * height)
    rows = np.linspace(0.0, 1.0, belt_top)[:, None]
    wall = (1 - rows) * np.asarray(_WALL_TOP) + rows * np.asarray(_WALL_BOTTOM)
    column = np.clip(wall * bright, 0, 255).astype(np.uint8)[:, None, :]
    # OpenCV fills in a fraction of the time numpy takes to broadcast a colour over 1080p.
    cv2.resize(column, (width, belt_top), dst=canvas[:belt_top],
               interpolation=cv2.INTER_NEAREST)
    cv2.rectangle(canvas, (0, belt_top), (width, height), _shade(_FLOOR, bright), -1)
    belt_colour = _shade(_BELT, bright)
    left, right = int(_BELT_LEFT * width), int(_BELT_RIGHT * width)
    for leg_x in (0.1, 0.5, 0.9):
        x = int(leg_x * width)
        cv2.rectangle(canvas, (x - max(1, width // 80), belt_bottom), (x + max(1, width // 80),
                      height), _shade(_JOINT, bright), -1)
    cv2.rectangle(canvas, (left, belt_top), (right, belt_bottom), belt_colour, -1)
    # Slats move with the belt; their phase is what a moving conveyor changes between frames.
    pitch = 0.07 * width
    slat = _shade(_BELT, bright * 0.75)
    rail = max(1, round(0.025 * height))
    x = left + layout.belt_phase * pitch
    while x < right:
        cv2.line(canvas, (int(x), belt_top + rail), (int(x), belt_bottom - rail), slat,
                 max(1, round(0.006 * width)), cv2.LINE_AA)
        x += pitch
    cv2.rectangle(canvas, (left, belt_top), (right, belt_top + rail), _shade(_RAIL, bright), -1)
    cv2.rectangle(canvas, (left, belt_bottom - rail), (right, belt_bottom),
                  _shade(_RAIL, bright), -1)
    return belt_colour


def _draw_arm(canvas, layout, height, width):
    """Draw the robot arm hanging from the ceiling; it never reaches below the belt's top."""
    bright = layout.brightness
    scale = min(height, width)
    base_x = (0.1 if layout.arm_side == 0 else 0.9) * width
    direction = 1.0 if layout.arm_side == 0 else -1.0
    shoulder = np.array([base_x, 0.04 * height])
    upper, fore = 0.3 * scale, 0.26 * scale
    first, second = (math.radians(a) for a in layout.arm_angles)
    elbow = shoulder + upper * np.array([direction * math.cos(first), math.sin(first)])
    wrist_angle = first + second
    wrist = elbow + fore * np.array([direction * math.cos(wrist_angle), math.sin(wrist_angle)])
    lowest = (_BELT_TOP - 0.05) * height
    if wrist[1] > lowest:
        wrist[1] = lowest
    thickness = max(1, round(0.045 * scale))
    arm, joint = _shade(_ARM, bright), _shade(_JOINT, bright)
    cv2.rectangle(canvas, (int(base_x - 0.06 * scale), 0),
                  (int(base_x + 0.06 * scale), int(0.05 * height)), joint, -1)
    for start, end in ((shoulder, elbow), (elbow, wrist)):
        cv2.line(canvas, tuple(int(v) for v in start), tuple(int(v) for v in end), arm,
                 thickness, cv2.LINE_AA)
    for point in (shoulder, elbow, wrist):
        cv2.circle(canvas, tuple(int(v) for v in point), max(1, round(0.035 * scale)), joint, -1,
                   cv2.LINE_AA)
    finger = max(1, round(0.05 * scale))
    for side in (-1, 1):
        tip = (int(wrist[0] + side * finger), int(min(wrist[1] + finger, lowest)))
        cv2.line(canvas, tuple(int(v) for v in wrist), tip, joint, max(1, thickness // 2),
                 cv2.LINE_AA)


def render_layout(layout, size=(64, 64), noise_rng=None):
    """
    Draw ``layout`` as an HxWx3 uint8 RGB frame of ``size`` = (height, width).

    Returns the frame and the item bounding boxes ``(x0, y0, x1, y1)`` in its pixels. Sensor
    noise is added only when ``noise_rng`` is given.
    """
    height, width = check_size(size)
    scale = max(1, math.ceil(MIN_DRAW_SIDE / min(height, width)))
    draw_h, draw_w = height * scale, width * scale
    canvas = np.empty((draw_h, draw_w, 3), dtype=np.uint8)
    belt_colour = _draw_background(canvas, layout, draw_h, draw_w)
    _draw_arm(canvas, layout, draw_h, draw_w)
    boxes = []
    for item in layout.items:
        x, y, size_px = item_placement(item, layout.kind, draw_h, draw_w)
        rgb = _shade(item.rgb, layout.brightness)
        _DRAWERS[layout.kind](canvas, (x, y), size_px, rgb, item, belt_colour)
        x, y, size_px = item_placement(item, layout.kind, height, width)
        extent_x, extent_y = _extent(layout.kind, size_px)
        boxes.append((int(x - extent_x / 2), int(y - extent_y / 2),
                      int(math.ceil(x + extent_x / 2)), int(math.ceil(y + extent_y / 2))))
    image = canvas
    if scale > 1:
        image = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    if noise_rng is not None:
        # Raw random bytes masked to 0..15 take about half the time of integers(), and the
        # saturating add and subtract avoid an int16 copy: both matter at 1920x1080.
        noise = np.frombuffer(noise_rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
        # The offset as a 4-value Scalar: OpenCV before 5 applies a bare number to the first
        # channel only, which would tint every frame.
        image = cv2.subtract(cv2.add(image, noise & 15), (NOISE_OFFSET,) * 3 + (0,))
    return np.ascontiguousarray(image), tuple(boxes)


def render_scene(rng, size=(64, 64), spec=DEFAULT_SPEC):
    """
    Draw one random scene: ``rng`` is a numpy Generator or an int seed; size is (height, width).

    Every draw that decides the layout is made before the resolution matters, so one rng state
    gives the same caption and layout at every size.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    layout = make_layout(rng, spec)
    image, boxes = render_layout(layout, size, noise_rng=rng)
    return Scene(image=image, caption=caption_for(layout.count, layout.colour, layout.kind),
                 layout=layout, boxes=boxes)


def scene_at(seed, index, size=(64, 64), spec=DEFAULT_SPEC):
    """Return frame ``index`` of the stream ``seed``: the same scene whoever renders it."""
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f'seed ({seed}) and index ({index}) must not be negative')
    return render_scene(np.random.default_rng([int(seed), int(index)]), size, spec)


def iter_scenes(count, seed=0, size=(64, 64), spec=DEFAULT_SPEC, start=0):
    """Yield ``count`` scenes, frames ``start`` to ``start + count - 1`` of the stream ``seed``."""
    for index in range(start, start + count):
        yield scene_at(seed, index, size, spec)
