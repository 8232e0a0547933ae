#!/usr/bin/env python3
"""Write the deterministic synthetic demo bag (MCAP, rosbag2 metadata version 9).

Regenerate the committed bag with (from the repository root, in the project venv):

    python scripts/make_demo_bag.py --out test/data/demo_bag --force

Contents with the defaults (bag time = header stamps, starting at EPOCH = 1_700_000_000 s):

* ``/joint_states``        sensor_msgs/msg/JointState, joints ``joint_1``..``joint_7``,
  position / velocity / effort smooth sinusoids, 20 Hz from t = 0 (80 messages in 4 s);
* ``/front_cam/image_raw`` sensor_msgs/msg/Image rgb8 64x48 (step 192), frame ``front_cam``,
  5 Hz from t = 10 ms (20 frames): a coloured disc moving on a gradient;
* ``/wrist_cam/image_raw`` sensor_msgs/msg/Image bgr8 48x48 (step 144), frame ``wrist_cam``,
  5 Hz from t = 110 ms, i.e. 100 ms after the front camera (20 frames): a bar sweeping a
  checker pattern.

The cameras are 10 ms after a joint state (``--camera-lag-ms``) so no two messages share a
timestamp: replay order is unambiguous and every image has a fresher joint state before it.
Everything is computed from the message index with numpy (float64, no randomness), so the
decoded content is reproducible; tests compare decoded content, never the bag's bytes.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:  # an installed capsule_ros (colcon install tree) first, else this source checkout
    from capsule_ros.ros.bag_io import BagRecorder, typestore_with
except ImportError:
    sys.path.insert(0, str(REPO))
    from capsule_ros.ros.bag_io import BagRecorder, typestore_with

EPOCH_S = 1_700_000_000
FRONT_TOPIC = '/front_cam/image_raw'
WRIST_TOPIC = '/wrist_cam/image_raw'
JOINT_TOPIC = '/joint_states'
JOINT_NAMES = [f'joint_{i}' for i in range(1, 8)]
IMAGE_TYPE = 'sensor_msgs/msg/Image'
JOINT_TYPE = 'sensor_msgs/msg/JointState'


def front_image(i: int, t: float, width: int = 64, height: int = 48) -> np.ndarray:
    """rgb8 (height, width, 3): a disc circling over a diagonal colour gradient."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3), np.float64)
    img[..., 0] = 40.0 + 120.0 * x / (width - 1)
    img[..., 1] = 40.0 + 120.0 * y / (height - 1)
    img[..., 2] = 90.0 + 40.0 * math.sin(2.0 * math.pi * 0.25 * t)
    cx = width / 2 + 0.3 * width * math.cos(2.0 * math.pi * 0.25 * t)
    cy = height / 2 + 0.3 * height * math.sin(2.0 * math.pi * 0.25 * t)
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= (0.15 * height) ** 2
    img[disc] = (230.0, 60.0 + 8.0 * (i % 20), 30.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def wrist_image(i: int, t: float, width: int = 48, height: int = 48) -> np.ndarray:
    """bgr8 (height, width, 3): a vertical bar sweeping over an 8-pixel checker."""
    y, x = np.mgrid[0:height, 0:width]
    checker = ((x // 8 + y // 8) % 2).astype(np.float64)
    img = np.empty((height, width, 3), np.float64)
    img[..., 0] = 60.0 + 100.0 * checker        # B
    img[..., 1] = 80.0 + 60.0 * checker         # G
    img[..., 2] = 100.0 + 20.0 * y / (height - 1)  # R
    bar = np.abs(x - (width - 1) * (0.5 + 0.45 * math.sin(2.0 * math.pi * 0.5 * t))) <= 3.0
    img[bar] = (20.0, 220.0, 240.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def joint_values(t: float) -> tuple[list[float], list[float], list[float]]:
    """Positions (rad), velocities (rad/s) and efforts (Nm) of the 7 joints at time t."""
    pos, vel, eff = [], [], []
    for j in range(7):
        f = 0.2 + 0.05 * j            # Hz
        a = 0.5 - 0.04 * j            # rad
        ph = 0.7 * j
        w = 2.0 * math.pi * f
        pos.append(a * math.sin(w * t + ph))
        vel.append(a * w * math.cos(w * t + ph))
        eff.append(2.0 + 0.5 * j + 0.8 * math.sin(w * t + ph + 0.5))
    return pos, vel, eff


def generate(seconds: float = 4.0, camera_hz: float = 5.0, joint_hz: float = 20.0,
             wrist_offset_ms: float = 100.0, camera_lag_ms: float = 10.0,
             epoch_s: int = EPOCH_S, typestore=None):
    """Yield ``(topic, msgtype, timestamp_ns, raw_cdr)`` in bag time order."""
    ts = typestore if typestore is not None else typestore_with(include_package=False)
    T = ts.types
    Header, Time = T['std_msgs/msg/Header'], T['builtin_interfaces/msg/Time']
    Image, JointState = T[IMAGE_TYPE], T[JOINT_TYPE]
    t0 = int(epoch_s) * 1_000_000_000

    def header(stamp_ns: int, frame: str):
        return Header(stamp=Time(sec=stamp_ns // 1_000_000_000,
                                 nanosec=stamp_ns % 1_000_000_000), frame_id=frame)

    def image(stamp_ns, frame, enc, arr):
        h, w, c = arr.shape
        return Image(header=header(stamp_ns, frame), height=h, width=w, encoding=enc,
                     is_bigendian=0, step=w * c, data=arr.reshape(-1))

    events = []  # (stamp_ns, order, topic, msgtype, msg)
    n_cam = int(round(seconds * camera_hz))
    cam_period = int(round(1e9 / camera_hz))
    lag = int(round(camera_lag_ms * 1e6))
    for i in range(n_cam):
        s = t0 + lag + i * cam_period
        t = (s - t0) / 1e9
        events.append((s, 1, FRONT_TOPIC, IMAGE_TYPE,
                       image(s, 'front_cam', 'rgb8', front_image(i, t))))
        s = t0 + lag + int(round(wrist_offset_ms * 1e6)) + i * cam_period
        t = (s - t0) / 1e9
        events.append((s, 2, WRIST_TOPIC, IMAGE_TYPE,
                       image(s, 'wrist_cam', 'bgr8', wrist_image(i, t))))
    n_joint = int(round(seconds * joint_hz))
    joint_period = int(round(1e9 / joint_hz))
    for k in range(n_joint):
        s = t0 + k * joint_period
        pos, vel, eff = joint_values((s - t0) / 1e9)
        events.append((s, 0, JOINT_TOPIC, JOINT_TYPE, JointState(
            header=header(s, 'base_link'), name=list(JOINT_NAMES),
            position=np.array(pos, np.float64), velocity=np.array(vel, np.float64),
            effort=np.array(eff, np.float64))))
    events.sort(key=lambda e: (e[0], e[1]))
    for s, _, topic, msgtype, msg in events:
        yield topic, msgtype, s, bytes(ts.serialize_cdr(msg, msgtype))


def write_demo_bag(out: str | Path, force: bool = False, **kw) -> int:
    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f'{out} exists (use --force to replace it)')
        shutil.rmtree(out)
    ts = typestore_with(include_package=False)
    with BagRecorder(out, typestore=ts) as rec:
        for topic, msgtype in ((JOINT_TOPIC, JOINT_TYPE), (FRONT_TOPIC, IMAGE_TYPE),
                               (WRIST_TOPIC, IMAGE_TYPE)):
            rec.add_topic(topic, msgtype)
        for item in generate(typestore=ts, **kw):
            rec.write(*item)
        return rec.count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default=str(REPO / 'test' / 'data' / 'demo_bag'))
    ap.add_argument('--force', action='store_true', help='replace an existing bag directory')
    ap.add_argument('--seconds', type=float, default=4.0)
    ap.add_argument('--camera-hz', type=float, default=5.0)
    ap.add_argument('--joint-hz', type=float, default=20.0)
    ap.add_argument('--wrist-offset-ms', type=float, default=100.0)
    ap.add_argument('--camera-lag-ms', type=float, default=10.0)
    ap.add_argument('--epoch', type=int, default=EPOCH_S, help='bag start time, seconds')
    a = ap.parse_args(argv)
    n = write_demo_bag(a.out, force=a.force, seconds=a.seconds, camera_hz=a.camera_hz,
                       joint_hz=a.joint_hz, wrist_offset_ms=a.wrist_offset_ms,
                       camera_lag_ms=a.camera_lag_ms, epoch_s=a.epoch)
    size = sum(p.stat().st_size for p in Path(a.out).rglob('*') if p.is_file())
    print(f'wrote {n} messages to {a.out} ({size} bytes)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
