"""Transforms (no torchvision): shapes, dtypes, determinism, flip, crop, occlusion value,
normalisation constants; ReidImageDataset and make_loader."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from transmatcher_fast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Compose,
                                               Normalize, Pad, RandomCrop, RandomHorizontalFlip,
                                               RandomOcclusion, RandomRotation, ReidImageDataset,
                                               Resize, ToTensor, build_test_transform,
                                               build_train_transform, make_loader)


def noise_image(h=96, w=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_train_transform_shape_dtype_range_and_determinism():
    image = noise_image()
    a = build_train_transform(64, 32, rng=random.Random(7))
    b = build_train_transform(64, 32, rng=random.Random(7))
    outs_a, outs_b = [a(image) for _ in range(4)], [b(image) for _ in range(4)]
    for x, y in zip(outs_a, outs_b):
        assert x.shape == (3, 64, 32) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
        assert torch.equal(x, y)
    assert not torch.equal(outs_a[0], outs_a[1])  # the stream moves on
    a.reseed(3), b.reseed(3)
    assert torch.equal(a(image), b(image))
    assert build_train_transform().transforms[0].size == (128, 384)  # upstream default 384x128


def test_test_transform_and_normalisation_constants():
    image = noise_image()
    plain = build_test_transform(64, 32)(image)
    assert plain.shape == (3, 64, 32) and plain.dtype == torch.float32
    expected = torch.from_numpy(np.array(image.resize((32, 64), Image.BICUBIC))).permute(2, 0, 1) / 255
    assert torch.allclose(plain, expected.float())
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    normed = build_test_transform(64, 32, normalize=True)(image)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normed, (plain - mean) / std)
    assert torch.allclose(Normalize()(mean.expand(3, 2, 2).clone()), torch.zeros(3, 2, 2))


def test_to_tensor_layout():
    array = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    x = ToTensor()(Image.fromarray(array))
    assert x.shape == (3, 2, 3) and x[2, 1, 0] == pytest.approx(array[1, 0, 2] / 255)


def test_flip_flips_and_never_flips():
    image = noise_image()
    array = np.asarray(image)
    assert np.array_equal(np.asarray(RandomHorizontalFlip(1.0, random.Random(0))(image)), array[:, ::-1])
    assert np.array_equal(np.asarray(RandomHorizontalFlip(0.0, random.Random(0))(image)), array)


def test_pad_and_crop_shift_the_image():
    image = noise_image(20, 10)
    padded = Pad(10)(image)
    assert padded.size == (30, 40) and np.asarray(padded)[:10].max() == 0
    rng = random.Random(1)
    crop = RandomCrop(20, 10, rng)(padded)
    assert crop.size == (10, 20)
    top, left = (lambda r: (r.randint(0, 20), r.randint(0, 20)))(random.Random(1))
    assert np.array_equal(np.asarray(crop), np.asarray(padded)[top:top + 20, left:left + 10])
    with pytest.raises(ValueError, match="smaller than the crop"):
        RandomCrop(50, 10)(padded)


def test_occlusion_pastes_one_white_square():
    black = Image.new("RGB", (128, 384))
    for seed in range(20):
        out = np.asarray(RandomOcclusion(0.0, 0.8, random.Random(seed))(black))
        ys, xs = np.nonzero(out[..., 0])
        side = ys.max() - ys.min() + 1
        assert 1 <= side <= 101 and xs.max() - xs.min() + 1 == side  # a square of side < 0.8 * 128
        assert len(ys) == side * side and (out[ys, xs] == 255).all()
    assert RandomOcclusion(0, 0)(black) is black
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomOcclusion(0.5, 0.2)


def test_rotation_and_jitter():
    image = noise_image()
    assert np.array_equal(np.asarray(RandomRotation(0.0, random.Random(0))(image)), np.asarray(image))
    rotated = np.asarray(RandomRotation(5.0, random.Random(0))(image))
    assert rotated.shape == (96, 48, 3) and not np.array_equal(rotated, np.asarray(image))
    identity = ColorJitter((1, 1), (1, 1), (1, 1), (0, 0), random.Random(0))(image)
    assert np.array_equal(np.asarray(identity), np.asarray(image))
    bright = ColorJitter((2, 2), (1, 1), (1, 1), (0, 0), random.Random(0))(Image.new("RGB", (4, 4), (50, 60, 70)))
    assert np.asarray(bright)[0, 0].tolist() == [100, 120, 140]
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    cyan = ColorJitter((1, 1), (1, 1), (1, 1), (0.5, 0.5), random.Random(0))(red)
    r, g, b = np.asarray(cyan)[0, 0].tolist()  # half a turn of hue: red -> cyan
    assert r < 10 and g > 240 and b > 240


def test_dataset_and_loader(tmp_path):
    items = []
    for i in range(6):
        path = tmp_path / f"{i:04d}_c1s1_000001_00.jpg"
        noise_image(40, 20, seed=i).save(path)
        items.append((str(path), i % 3, i % 2))
    dataset = ReidImageDataset(items, build_test_transform(32, 16))
    image, pid, cam, index = dataset[4]
    assert image.shape == (3, 32, 16) and (pid, cam, index) == (1, 0, 4)

    def batches(workers):
        loader = make_loader(items, build_train_transform(32, 16, rng=random.Random(0)), batch_size=4,
                             shuffle=True, num_workers=workers, seed=11)
        assert loader.pin_memory == torch.cuda.is_available()
        return [b for b in loader]

    first, second = batches(2), batches(2)
    assert [b[0].shape for b in first] == [(4, 3, 32, 16), (2, 3, 32, 16)]
    for a, b in zip(first, second):
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert sorted(torch.cat([b[3] for b in first]).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        make_loader(items, None, 0)


def _items(tmp_path, n=8):
    items = []
    for i in range(n):
        path = tmp_path / f"{i:04d}_c1s1_000001_00.jpg"
        noise_image(40, 20, seed=i).save(path)
        items.append((str(path), i % 4, i % 2))
    return items


def test_seeded_loader_augments_alike_for_any_worker_count(tmp_path):
    """A seeded loader's augmentation is a function of (seed, stream, epoch, position, index):
    0, 1 or 2 workers give the same batches; another epoch, seed, stream or position gives other
    augmentations, and the same index twice in one epoch is augmented twice differently."""
    items = _items(tmp_path)
    order = [3, 1, 3, 0, 7, 5, 2, 3]  # index 3 three times, as the graph sampler repeats images

    def batches(workers, epoch=0, seed=5, stream=0):
        loader = make_loader(items, build_train_transform(32, 16), batch_size=4, sampler=order,
                             num_workers=workers, seed=seed, stream=stream)
        loader.dataset.set_epoch(epoch)
        return [b for b in loader]

    reference = batches(0)
    assert [b[3].tolist() for b in reference] == [order[:4], order[4:]]
    for workers in (1, 2):
        for a, b in zip(reference, batches(workers)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    images = torch.cat([b[0] for b in reference])
    assert not torch.equal(images[0], images[2]) and not torch.equal(images[0], images[7])
    for other in (batches(0, epoch=1), batches(0, seed=6), batches(0, stream=1)):
        assert not torch.equal(torch.cat([b[0] for b in other]), images)
    assert len(make_loader(items, None, 4, sampler=order, seed=0)) == 2


def test_seeded_shuffling_loader_repeats_and_ignores_workers(tmp_path):
    items = _items(tmp_path)

    def batches(workers):
        loader = make_loader(items, build_train_transform(32, 16), batch_size=3, shuffle=True,
                             num_workers=workers, seed=11)
        return [b for b in loader]

    zero, two = batches(0), batches(2)
    for a, b in zip(zero, two):
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert sorted(torch.cat([b[3] for b in zero]).tolist()) == list(range(8))
    assert torch.cat([b[3] for b in zero]).tolist() != list(range(8))  # shuffled


def test_a_truncated_training_image_is_named(tmp_path):
    from PIL import Image

    from transmatcher_fast.data.transforms import ReidImageDataset

    path = tmp_path / "0001_c1_000.jpg"
    Image.new("RGB", (32, 64), (120, 30, 200)).save(path)
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(OSError, match=str(path)):
        ReidImageDataset([(str(path), 0, 0)])[0]


# --- TransReID's transforms and timm's RandomErasing -----------------------------------------

from transmatcher_fast.data.transforms import (RandomApply, RandomErasing,  # noqa: E402
                                               build_transreid_test_transform,
                                               build_transreid_train_transform)


def test_transreid_train_transform_steps_shape_and_determinism():
    t = build_transreid_train_transform(rng=random.Random(0))
    assert [type(s).__name__ for s in t.transforms] == [
        "Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor", "Normalize", "RandomErasing"]
    resize, flip, pad, crop, _, norm, erase = t.transforms
    assert resize.size == (128, 256) and resize.interpolation == Image.BICUBIC  # upstream interpolation=3
    assert flip.p == 0.5 and pad.padding == 10 and pad.fill == 0 and (crop.height, crop.width) == (256, 128)
    half = torch.full((3,), 0.5)
    assert torch.equal(norm.mean.flatten(), half) and torch.equal(norm.std.flatten(), half)
    assert (erase.p, erase.mode, erase.min_area, erase.max_area, erase.min_aspect, erase.max_attempts) == (
        0.5, "pixel", 0.02, 1 / 3, 0.3, 10)
    assert erase.max_aspect == pytest.approx(1 / 0.3)
    assert flip.rng is crop.rng is erase.rng  # one shared stream: one reseed fixes all
    assert "RandomErasing(p=0.5" in repr(t) and "interpolation=bicubic" in repr(t)

    image = noise_image(100, 50)
    a = build_transreid_train_transform(64, 32, rng=random.Random(3))
    b = build_transreid_train_transform(64, 32, rng=random.Random(3))
    outs = [a(image) for _ in range(6)]
    for x, y in zip(outs, [b(image) for _ in range(6)]):
        assert x.shape == (3, 64, 32) and x.dtype == torch.float32 and torch.equal(x, y)
    assert not torch.equal(outs[0], outs[1])
    a.reseed(9), b.reseed(9)
    assert torch.equal(a(image), b(image))
    assert build_transreid_train_transform(erasing_p=0.0, pad=0).transforms[-1].__class__.__name__ == "Normalize"


def test_transreid_train_transform_values():
    image = noise_image(100, 50)
    expected = torch.from_numpy(np.array(image.resize((32, 64), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    expected = (expected - 0.5) / 0.5
    plain = build_transreid_train_transform(64, 32, flip_p=0.0, pad=0, erasing_p=0.0, rng=random.Random(0))
    assert torch.allclose(plain(image), expected)
    flipped = build_transreid_train_transform(64, 32, flip_p=1.0, pad=0, erasing_p=0.0, rng=random.Random(0))
    assert torch.allclose(flipped(image), expected.flip(-1))
    # pad + crop: a white image shows the zero padding as -1 (normalised), with varying offsets
    white = Image.new("RGB", (50, 100), (255, 255, 255))
    shifted = build_transreid_train_transform(64, 32, erasing_p=0.0, rng=random.Random(1))
    padded = [int((shifted(white) == -1).all(0).sum()) for _ in range(20)]
    assert max(padded) > 0 and len(set(padded)) > 3
    for _ in range(5):
        x = shifted(white)
        assert set(torch.unique(x).tolist()) <= {-1.0, 1.0}


def test_transreid_test_transform_is_bilinear_and_normalised():
    image = noise_image()
    x = build_transreid_test_transform(64, 32)(image)
    expected = torch.from_numpy(np.array(image.resize((32, 64), Image.BILINEAR))).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, (expected - 0.5) / 0.5)
    bicubic = torch.from_numpy(np.array(image.resize((32, 64), Image.BICUBIC))).permute(2, 0, 1).float() / 255
    assert not torch.allclose(x, (bicubic - 0.5) / 0.5)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    y = build_transreid_test_transform(64, 32, mean, std)(image)
    assert torch.allclose(y, (expected - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    assert build_transreid_test_transform().transforms[0].size == (128, 256)


def _timm_box(rng, height, width, p=0.5, min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
    """timm 0.3.2's RandomErasing._erase (max_count=1), transcribed, on the same rng."""
    import math
    if rng.random() >= p:
        return None
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(attempts):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def test_erasing_box_follows_timm_and_stays_in_bounds():
    eraser, replay = RandomErasing(rng=random.Random(5)), random.Random(5)
    boxes = []
    for _ in range(4000):
        box = eraser.sample_box(256, 128)
        assert box == _timm_box(replay, 256, 128)
        if box is not None:
            boxes.append(box)
    assert 0.45 < len(boxes) / 4000 < 0.55  # p = 0.5; an attempt that fits is found almost always
    tops, lefts, hs, ws = (np.array(v) for v in zip(*boxes))
    assert (tops >= 0).all() and (lefts >= 0).all() and (tops + hs <= 256).all() and (lefts + ws <= 128).all()
    assert (hs < 256).all() and (ws < 128).all()
    fraction = hs * ws / (256 * 128)
    # both sides round, so the area leaves [2 %, 33.3 %] by at most half a pixel per side
    assert fraction.min() >= 0.018 and fraction.max() <= 0.35
    assert fraction.min() < 0.03 and fraction.max() > 0.3  # and covers the range
    aspect = hs / ws
    assert aspect.min() >= 0.3 * 0.9 and aspect.max() <= (1 / 0.3) * 1.1
    assert np.mean(np.log(aspect)) == pytest.approx(0.0, abs=0.2)  # log-uniform: symmetric
    # the whole area never fits strictly inside: after 10 attempts nothing is erased (timm too)
    full = torch.ones(3, 10, 10)
    for s in range(20):
        assert RandomErasing(1.0, 1.0, 1.0, rng=random.Random(s)).sample_box(10, 10) is None
        assert torch.equal(RandomErasing(1.0, 1.0, 1.0, rng=random.Random(s))(full), full)
    # on a tiny image a side can round to 0: timm then erases an empty slice, and so do we
    tiny = [RandomErasing(1.0, rng=random.Random(s)).sample_box(8, 1) for s in range(50)]
    assert all(b is None or b[3] == 0 for b in tiny) and any(b is not None for b in tiny)


def test_erasing_fills_the_sampled_box_with_pixel_noise():
    image = torch.full((3, 256, 128), 100.0)
    eraser, replay = RandomErasing(1.0, rng=random.Random(2)), RandomErasing(1.0, rng=random.Random(2))
    values = []
    for _ in range(30):
        out = eraser(image)
        top, left, h, w = replay.sample_box(256, 128)
        replay.rng.getrandbits(63)  # the noise seed drawn after the box
        mask = out != 100.0
        assert mask.any(0).sum() == h * w and mask[:, top:top + h, left:left + w].all()
        box = out[:, top:top + h, left:left + w]
        assert not torch.equal(box[0], box[1])  # per channel
        assert box[0].unique().numel() > h * w // 2  # per pixel
        values.append(box.flatten())
    assert torch.equal(image, torch.full((3, 256, 128), 100.0))  # the input is left alone
    noise = torch.cat(values).double()
    assert noise.numel() > 100_000
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02  # N(0, 1)
    assert (noise.abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.01)
    assert (noise.abs() < 2).double().mean().item() == pytest.approx(0.9545, abs=0.01)


def test_erasing_modes_determinism_batches_and_errors():
    image = torch.full((3, 64, 32), 7.0)
    const = RandomErasing(1.0, mode="const", rng=random.Random(0))(image)
    assert (const == 0).any() and set(torch.unique(const).tolist()) == {0.0, 7.0}
    rand = RandomErasing(1.0, mode="rand", rng=random.Random(0))(image)
    erased = (rand != 7.0).all(0)
    for c in range(3):
        assert rand[c][erased].unique().numel() == 1  # one colour per channel
    a = RandomErasing(0.5, rng=random.Random(4))
    b = RandomErasing(0.5, rng=random.Random(4))
    outs = [a(image) for _ in range(10)]
    assert all(torch.equal(x, b(image)) for x in outs)
    assert any(torch.equal(x, image) for x in outs) and any(not torch.equal(x, image) for x in outs)
    assert all(torch.equal(RandomErasing(0.0, rng=random.Random(s))(image), image) for s in range(20))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    RandomErasing(1.0, rng=random.Random(0))(image)
    assert torch.equal(torch.get_rng_state(), state)  # never draws from torch's global generator
    batch = torch.full((4, 3, 64, 32), 7.0)
    out = RandomErasing(1.0, rng=random.Random(1))(batch)
    assert out.shape == batch.shape and all((out[i] != 7.0).any() for i in range(4))
    for kwargs, message in (({"p": 1.5}, "probability"), ({"min_area": 0.5, "max_area": 0.1}, "min_area"),
                            ({"mode": "noise"}, "mode"), ({"min_aspect": 0}, "min_aspect")):
        with pytest.raises(ValueError, match=message):
            RandomErasing(**kwargs)
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        RandomErasing()(torch.zeros(3, 4))


def test_compose_reseed_reaches_nested_rngs():
    inner, outer = random.Random(0), random.Random(1)
    t = Compose([RandomApply(ColorJitter(rng=inner), 0.5, rng=outer)])
    t.reseed(3)
    a = (inner.random(), outer.random())
    t.reseed(3)
    assert (inner.random(), outer.random()) == a


def test_seeded_transreid_loader_ignores_workers(tmp_path):
    items = _items(tmp_path)

    def batches(workers, epoch=0):
        loader = make_loader(items, build_transreid_train_transform(32, 16, pad=2, erasing_p=0.8),
                             batch_size=4, shuffle=True, num_workers=workers, seed=21)
        loader.dataset.set_epoch(epoch)
        return [b for b in loader]

    zero, two = batches(0), batches(2)
    for a, b in zip(zero, two):
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert not torch.equal(torch.cat([b[0] for b in batches(0, epoch=1)]), torch.cat([b[0] for b in zero]))
