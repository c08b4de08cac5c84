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
