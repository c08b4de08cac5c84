"""Procedural synthetic persons written as JPEGs in Market-1501 layout.

Each identity has its own clothing (upper/lower colours and textures, sleeves, shoes, hair, an
optional chest emblem and bag); each camera its own background clutter, illumination, colour cast,
scale, blur, noise and preferred viewpoints; each image a viewpoint (front/back/side changes what is
visible: face or hair, emblem, backpack or straps), a small pose jitter and sometimes an occluder.
Images of one camera share background and lighting, so same-camera matching is easy and
cross-camera matching is not.

Every random draw comes from a generator seeded by (seed, what, ids...), so a file depends only on
the seed and its own identity/camera/index: the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image, ImageFilter

SPLITS = ("bounding_box_train", "query", "bounding_box_test")
VIEWS = ("front", "back", "side")
_SKIN = np.array([[255, 224, 196], [234, 192, 134], [198, 134, 66], [141, 85, 36], [90, 56, 37]], np.float32)
_HAIR = np.array([[20, 15, 10], [60, 40, 20], [110, 75, 40], [200, 170, 100], [130, 130, 130]], np.float32)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random clothing colour: hue uniform, fairly saturated, sometimes near-black/white/grey."""
    if rng.random() < 0.25:
        return np.full(3, rng.uniform(20, 235), np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    hue = rng.uniform(0, 1)
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)  # HSV hue -> RGB
    sat, val = rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0)
    return (255 * val * (1 - sat + sat * rgb)).astype(np.float32)


@dataclass
class Identity:
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: Tuple[np.ndarray, np.ndarray]
    upper_texture: int  # 0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks
    upper_freq: float
    short_sleeves: bool
    emblem: np.ndarray  # chest print, seen from the front only; None-like when alpha 0
    has_emblem: bool
    lower: Tuple[np.ndarray, np.ndarray]
    lower_texture: int  # 0 solid, 1 stripes
    shorts: bool
    shoes: np.ndarray
    bag: int  # 0 none, 1 backpack, 2 shoulder bag
    bag_colour: np.ndarray
    width: float
    height: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Identity":
        return cls(skin=_SKIN[rng.integers(len(_SKIN))] + rng.uniform(-12, 12, 3).astype(np.float32),
                   hair=_HAIR[rng.integers(len(_HAIR))], long_hair=bool(rng.random() < 0.4),
                   upper=(_colour(rng), _colour(rng)), upper_texture=int(rng.integers(4)),
                   upper_freq=float(rng.uniform(8, 22)), short_sleeves=bool(rng.random() < 0.4),
                   emblem=_colour(rng), has_emblem=bool(rng.random() < 0.5),
                   lower=(_colour(rng), _colour(rng)), lower_texture=int(rng.random() < 0.3),
                   shorts=bool(rng.random() < 0.25), shoes=_colour(rng) * 0.6,
                   bag=int(rng.choice(3, p=[0.4, 0.35, 0.25])), bag_colour=_colour(rng),
                   width=float(rng.uniform(0.85, 1.15)), height=float(rng.uniform(0.92, 1.04)))


@dataclass
class Camera:
    background: np.ndarray  # [H + 8, W + 8, 3] float32, cropped with a small per-image shift
    gain: float
    cast: np.ndarray
    gamma: float
    scale: float  # person height / image height
    blur: float
    noise: float
    views: np.ndarray  # probabilities of front, back, side
    clutter: np.ndarray  # occluder colours

    @classmethod
    def draw(cls, rng: np.random.Generator, height: int, width: int) -> "Camera":
        h, w = height + 8, width + 8
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        top, bottom = _colour(rng) * 0.8, _colour(rng) * 0.8
        t = (yy / h)[..., None]
        background = (1 - t) * top + t * bottom
        clutter = np.stack([_colour(rng) for _ in range(6)])
        for _ in range(int(rng.integers(6, 14))):  # walls, windows, poles, signs
            y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
            y1, x1 = y0 + rng.uniform(4, h / 2), x0 + rng.uniform(2, w / 2)
            box = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            background = np.where(box[..., None], clutter[rng.integers(len(clutter))], background)
        floor = yy > h * rng.uniform(0.75, 0.9)
        background = np.where(floor[..., None], _colour(rng) * 0.7, background)
        background += rng.normal(0, 6, background.shape).astype(np.float32)  # texture
        return cls(background=background.astype(np.float32), gain=float(rng.uniform(0.55, 1.35)),
                   cast=rng.uniform(0.72, 1.28, 3).astype(np.float32), gamma=float(rng.uniform(0.75, 1.3)),
                   scale=float(rng.uniform(0.72, 0.95)), blur=float(rng.choice([0, 0, 0.6, 1.0, 1.5])),
                   noise=float(rng.uniform(2, 9)), views=rng.dirichlet([0.6, 0.6, 0.6]),
                   clutter=clutter)


def _texture(kind: int, freq: float, u, v, colours):
    """Pattern of two colours in person coordinates: 0 solid, 1 horizontal, 2 vertical, 3 checks."""
    a, b = colours
    if kind == 0:
        return a
    rows, cols = np.floor(v * freq) % 2, np.floor(u * freq) % 2
    pick = {1: rows, 2: cols, 3: (rows + cols) % 2}[kind]
    return np.where(pick[..., None] > 0, b, a)


def render(person: Identity, camera: Camera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """One image of ``person`` seen by ``camera``."""
    dy, dx = rng.integers(0, 9, 2)
    canvas = camera.background[dy:dy + height, dx:dx + width].copy()
    view = VIEWS[rng.choice(3, p=camera.views)]
    facing = 1 if rng.random() < 0.5 else -1  # side view: which way the person looks
    ph = height * camera.scale * person.height * rng.uniform(0.95, 1.05)
    top = (height - ph) * rng.uniform(0.3, 0.7)
    cx = width / 2 + width * rng.uniform(-0.07, 0.07)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    v, u = (yy - top) / ph, (xx - cx) / ph  # person coordinates: v 0 (head) .. 1 (feet)
    side = view == "side"
    torso_w = (0.075 if side else 0.115) * person.width
    leg_w = 0.05 if side else 0.095 * person.width

    figure = np.zeros((height, width), bool)  # pixels of the person, for the shading below

    def paint(mask, colour, part_of_person=True):
        nonlocal canvas, figure
        canvas = np.where(mask[..., None], colour, canvas)
        figure = (figure | mask) if part_of_person else (figure & ~mask)

    # Drawing order is back to front. A backpack seen from the side sticks out behind the torso.
    if person.bag == 1 and side:
        paint((v > 0.17) & (v < 0.46) & (u * facing < -torso_w + 0.02) & (u * facing > -torso_w - 0.07),
              person.bag_colour)
    arm = (v > 0.16) & (v < 0.5) & (np.abs(u) < torso_w + 0.04) if not side else \
        (v > 0.17) & (v < 0.5) & (np.abs(u - facing * 0.01) < 0.035)
    sleeve = arm & (v < 0.28) if person.short_sleeves else arm
    paint(arm, person.skin)
    paint(sleeve, person.upper[0])
    legs = (v >= 0.5) & (v < 0.94) & (np.abs(u) < leg_w) & ~((np.abs(u) < 0.012) & (v > 0.6) & ~side)
    paint(legs, _texture(person.lower_texture, person.upper_freq, u, v, person.lower))
    if person.shorts:
        paint(legs & (v > 0.68), person.skin)
    paint((v >= 0.94) & (v < 1.0) & (np.abs(u - (0.015 * facing if side else 0)) < leg_w + 0.01), person.shoes)
    torso = (v >= 0.15) & (v < 0.53) & (np.abs(u) < torso_w * (1 - 0.15 * (v - 0.15)))
    paint(torso, _texture(person.upper_texture, person.upper_freq, u, v, person.upper))
    if person.has_emblem and view == "front":
        paint((v > 0.24) & (v < 0.34) & (np.abs(u) < 0.05), person.emblem)
    if person.bag == 1 and view == "back":
        paint((v > 0.18) & (v < 0.45) & (np.abs(u) < 0.085), person.bag_colour)
    if person.bag == 1 and view == "front":  # only the straps
        paint((v > 0.15) & (v < 0.33) & (np.abs(np.abs(u) - 0.06) < 0.012), person.bag_colour)
    if person.bag == 2:  # shoulder bag at the hip; its side flips with the view
        bag_side = {"front": 1, "back": -1, "side": -facing}[view]
        paint((v > 0.4) & (v < 0.56) & (u * bag_side > torso_w - 0.01) & (u * bag_side < torso_w + 0.07),
              person.bag_colour)
    head = ((u / 0.055) ** 2 + ((v - 0.08) / 0.075) ** 2) < 1
    hair = head & (v < 0.045) if view == "front" else head if view == "back" else head & ((u * facing < -0.01) | (v < 0.04))
    paint(head, person.skin)
    paint(hair, person.hair)
    if person.long_hair and view != "front":
        paint((v > 0.1) & (v < 0.22) & (np.abs(u + (0.02 * facing if side else 0)) < 0.05), person.hair)

    # Shading gives the body some volume and ties the colour to where it is seen from.
    canvas = np.where(figure[..., None], canvas * (1 - 1.5 * np.abs(u)[..., None]), canvas)
    if rng.random() < 0.3:  # occluder: another object in front of the person, entering from a side
        occ_h, occ_w = rng.uniform(0.2, 0.5) * height, rng.uniform(0.3, 0.6) * width
        y0 = rng.uniform(height * 0.3, height - occ_h)
        x_box = (xx < occ_w) if rng.random() < 0.5 else (xx >= width - occ_w)
        paint(x_box & (yy >= y0) & (yy < y0 + occ_h), camera.clutter[rng.integers(len(camera.clutter))],
              part_of_person=False)

    light = camera.gain * rng.uniform(0.95, 1.05)
    canvas = 255 * (np.clip(canvas * camera.cast * light, 0, 255) / 255) ** camera.gamma
    canvas += rng.normal(0, camera.noise, canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    return image.filter(ImageFilter.GaussianBlur(camera.blur)) if camera.blur else image


def generate_synthetic(out, ids: int = 100, cams: int = 6, images_per_cam: int = 8, seed: int = 0,
                       height: int = 128, width: int = 64, quality: int = 90) -> Dict[str, int]:
    """Write ``ids`` identities × ``cams`` cameras × ``images_per_cam`` images under ``out`` in
    Market-1501 layout. The first ``(ids + 1) // 2`` identities (pids 1..) go to
    ``bounding_box_train``; of the others, image 0 of each camera goes to ``query`` and the rest to
    ``bounding_box_test``. Returns the number of images per split."""
    if ids < 2:
        raise ValueError(f"ids must be at least 2 (train and test identities are disjoint), got {ids}")
    if not 1 <= cams <= 9:
        raise ValueError(f"cams must be in 1..9 (Market-1501 names hold one camera digit), got {cams}")
    if images_per_cam < 1 or height < 16 or width < 8:
        raise ValueError(f"need images_per_cam >= 1, height >= 16, width >= 8; got "
                         f"{images_per_cam}, {height}, {width}")
    out = Path(out)
    for split in SPLITS:
        folder = out / split
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; choose a new --out folder")
        folder.mkdir(parents=True, exist_ok=True)
    cameras = [Camera.draw(_rng(seed, 1, c), height, width) for c in range(cams)]
    n_train = (ids + 1) // 2
    counts = dict.fromkeys(SPLITS, 0)
    for pid in range(1, ids + 1):
        person = Identity.draw(_rng(seed, 0, pid))
        for c, camera in enumerate(cameras):
            for k in range(images_per_cam):
                image = render(person, camera, _rng(seed, 2, pid, c, k), height, width)
                split = SPLITS[0] if pid <= n_train else SPLITS[1] if k == 0 else SPLITS[2]
                frame = 25 * (pid * images_per_cam + k) + 1
                image.save(out / split / f"{pid:04d}_c{c + 1}s1_{frame:06d}_{k:02d}.jpg", quality=quality)
                counts[split] += 1
    (out / "synthetic.json").write_text(json.dumps(
        {"ids": ids, "cams": cams, "images_per_cam": images_per_cam, "seed": seed, "height": height,
         "width": width, "quality": quality, "train_ids": n_train, "images": counts}, indent=2) + "\n")
    return counts
