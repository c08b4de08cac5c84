"""DINO multi-crop (no torchvision): the crop ops (RandomResizedCrop with torchvision's fallback,
RandomApply, RandomGrayscale, GaussianBlur, Solarize, DINO's jitter), MultiCropTransform's
shapes, ranges, determinism and per-crop probabilities (solarisation on global 2 only),
UnlabelledImages, list_images, MultiCropCollate's crop-major layouts and the seeded loader."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from transmatcher_fast.data.multicrop import (MultiCropCollate, MultiCropTransform, UnlabelledImages,
                                              list_images, make_multicrop_loader)
from transmatcher_fast.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, GaussianBlur,
                                               RandomApply, RandomGrayscale, RandomResizedCrop,
                                               Solarize)

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def noise_image(h=96, w=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def small(rng=None, local_crops=3):
    return MultiCropTransform((32, 16), (16, 8), local_crops=local_crops, rng=rng)


# --- the ops ---------------------------------------------------------------------------------

def test_random_resized_crop_draws_within_scale_and_ratio():
    crop = RandomResizedCrop(64, 32, scale=(0.4, 1.0), rng=random.Random(0))
    fallbacks = 0
    for _ in range(2000):
        top, left, h, w = crop.get_params(400, 400)  # square: every draw can fit
        assert 0 <= top <= 400 - h and 0 <= left <= 400 - w
        assert 0.4 * 0.97 <= h * w / 400 ** 2 <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # a person image (W/H = 1/2): a draw fits only when scale * ratio <= 1/2, about 19 % of them,
    # so 0.81 ** 10 = 12.5 % of the global crops end in the centre-crop fallback (as upstream)
    person = RandomResizedCrop(64, 32, scale=(0.4, 1.0), rng=random.Random(0))
    for _ in range(2000):
        top, left, h, w = person.get_params(100, 200)
        assert 0 <= top <= 200 - h and 0 <= left <= 100 - w
        fallbacks += (top, left, h, w) == (33, 0, 133, 100)
    assert 0.095 < fallbacks / 2000 < 0.155


def test_random_resized_crop_fallback_is_torchvisions_centre_crop():
    never = RandomResizedCrop(8, 4, scale=(1.0, 1.0), rng=random.Random(0))  # whole area, ratio >= 3/4
    assert never.get_params(100, 200) == ((200 - 133) // 2, 0, 133, 100)  # tall: w = W, h = W / (3/4)
    assert never.get_params(300, 100) == (0, (300 - 133) // 2, 100, 133)  # wide: h = H, w = H * 4/3
    square = RandomResizedCrop(8, 4, scale=(1.0, 1.0), ratio=(0.5, 2.0), attempts=0, rng=random.Random(0))
    assert square.get_params(100, 120) == (0, 0, 120, 100)  # in range: the whole image
    image = noise_image(120, 60)
    crop, replay = (RandomResizedCrop(40, 20, scale=(0.2, 0.6), rng=random.Random(s)) for s in (3, 3))
    top, left, h, w = replay.get_params(60, 120)
    expected = image.crop((left, top, left + w, top + h)).resize((20, 40), Image.BICUBIC)
    assert np.array_equal(np.asarray(crop(image)), np.asarray(expected))
    for kwargs in ({"scale": (0.5, 0.2)}, {"scale": (0.0, 1.0)}, {"ratio": (2.0, 1.0)}):
        with pytest.raises(ValueError):
            RandomResizedCrop(8, 4, **kwargs)


def _rate(op, image, changed, n=2000):
    return sum(changed(op(image)) for _ in range(n)) / n


def test_op_probabilities_on_many_draws():
    colour = noise_image(8, 8)
    same = lambda out: np.array_equal(np.asarray(out), np.asarray(colour))  # noqa: E731
    calls = []
    marker = RandomApply(lambda img: calls.append(1) or img, 0.8, random.Random(0))
    for _ in range(2000):
        marker(colour)
    assert 0.76 < len(calls) / 2000 < 0.84
    def gray(out):
        a = np.asarray(out)
        return (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert 0.17 < _rate(RandomGrayscale(0.2, random.Random(0)), colour, gray) < 0.23
    for p in (0.1, 0.5):
        assert p - 0.035 < _rate(GaussianBlur(p, rng=random.Random(0)), colour, lambda o: not same(o)) < p + 0.035
    assert _rate(GaussianBlur(1.0, rng=random.Random(0)), colour, lambda o: not same(o), 200) == 1.0
    assert 0.17 < _rate(Solarize(0.2, rng=random.Random(0)), colour, lambda o: not same(o)) < 0.23
    assert _rate(Solarize(0.0, rng=random.Random(0)), colour, lambda o: not same(o), 200) == 0.0


def test_grayscale_blur_and_solarize_values():
    image = noise_image(16, 8)
    gray = np.asarray(RandomGrayscale(1.0, random.Random(0))(image))
    assert np.array_equal(gray[..., 0], np.asarray(image.convert("L"))) and (gray[..., 0] == gray[..., 2]).all()
    blur, replay = GaussianBlur(0.5, rng=random.Random(1)), GaussianBlur(0.5, rng=random.Random(1))
    for _ in range(10):
        radius = replay.get_params()
        expected = image if radius is None else image.filter(ImageFilter.GaussianBlur(radius))
        assert np.array_equal(np.asarray(blur(image)), np.asarray(expected))
    sampler = GaussianBlur(1.0, rng=random.Random(2))
    radii = np.array([sampler.get_params() for _ in range(3000)])
    assert radii.min() >= 0.1 and radii.max() <= 2.0 and radii.mean() == pytest.approx(1.05, abs=0.03)
    assert np.histogram(radii, bins=4, range=(0.1, 2.0))[0].min() > 600  # uniform
    solar = np.asarray(Solarize(1.0, rng=random.Random(0))(image))
    assert np.array_equal(solar, np.asarray(ImageOps.solarize(image, 128)))
    array = np.asarray(image)
    assert np.array_equal(solar, np.where(array >= 128, 255 - array, array))


def test_dino_colour_jitter_ranges():
    jitter = ColorJitter.from_strengths(0.4, 0.4, 0.2, 0.1)
    assert jitter.ranges == {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4),
                             "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    assert ColorJitter.from_strengths(1.5).ranges["brightness"] == (0.0, 2.5)  # clamped at 0
    with pytest.raises(ValueError, match="hue"):
        ColorJitter.from_strengths(hue=0.6)
    with pytest.raises(ValueError, match=">= 0"):
        ColorJitter.from_strengths(-0.1)


# --- MultiCropTransform ----------------------------------------------------------------------

def test_multicrop_shapes_ranges_and_structure():
    crops = MultiCropTransform(rng=random.Random(0))(noise_image(200, 80))
    assert len(crops) == 10
    assert [tuple(c.shape) for c in crops] == [(3, 256, 128)] * 2 + [(3, 128, 64)] * 8
    for crop in crops:
        assert crop.dtype == torch.float32
        pixels = crop * STD + MEAN  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    t = small(local_crops=0)
    assert t.num_crops == 2 and len(t(noise_image())) == 2
    full = MultiCropTransform()
    blur = {name: [s.p for s in getattr(full, name).transforms if isinstance(s, GaussianBlur)]
            for name in ("global1", "global2", "local")}
    assert blur == {"global1": [1.0], "global2": [0.1], "local": [0.5]}
    solar = {name: [s.p for s in getattr(full, name).transforms if isinstance(s, Solarize)]
             for name in ("global1", "global2", "local")}
    assert solar == {"global1": [], "global2": [0.2], "local": []}
    crop_ops = [full.global1.transforms[0], full.local.transforms[0]]
    assert [(c.height, c.width, c.scale, c.interpolation) for c in crop_ops] == [
        (256, 128, (0.4, 1.0), Image.BICUBIC), (128, 64, (0.05, 0.4), Image.BICUBIC)]
    assert crop_ops[0].ratio == (3 / 4, 4 / 3)  # upstream keeps torchvision's default
    assert "Solarize(p=0.2" in repr(full) and "GaussianBlur(p=0.1" in repr(full)
    with pytest.raises(ValueError, match="local_crops"):
        MultiCropTransform(local_crops=-1)


def test_multicrop_is_deterministic_per_seed():
    image = noise_image(120, 50)
    a, b = small(random.Random(7)), small(random.Random(7))
    for _ in range(3):
        for x, y in zip(a(image), b(image)):
            assert torch.equal(x, y)
    a.reseed(11), b.reseed(11)
    first = a(image)
    assert all(torch.equal(x, y) for x, y in zip(first, b(image)))
    a.reseed(11)
    assert all(torch.equal(x, y) for x, y in zip(first, a(image)))
    a.reseed(12)
    assert not all(torch.equal(x, y) for x, y in zip(first, a(image)))
    assert not torch.equal(first[2], first[3])  # the locals differ from each other


def test_solarisation_only_on_the_second_global_crop():
    """A uniform light-grey image stays uniform through crop, flip, jitter (brightness 0.6-1.4
    keeps it >= 150), grayscale and blur; only solarisation takes it below 128."""
    t = small(random.Random(0), local_crops=2)
    image = Image.new("RGB", (20, 40), (250, 250, 250))
    solarised = np.zeros(4)
    n = 500
    for _ in range(n):
        for i, crop in enumerate(t(image)):
            value = ((crop * STD + MEAN) * 255).mean().item()
            assert value >= 148 or value <= 107
            solarised[i] += value < 128
    assert solarised[0] == 0 and solarised[2] == 0 and solarised[3] == 0
    assert 0.15 < solarised[1] / n < 0.25


def test_jitter_and_grayscale_rates_through_the_pipeline():
    """Through the whole pipeline: a pure-colour crop becomes grey only by the grayscale step
    (p 0.2); it stays exactly its colour only when jitter is skipped (p 0.2) or draws factors
    that leave it (never), and no blur or flip changes a uniform image."""
    t = small(random.Random(1), local_crops=1)
    red = Image.new("RGB", (20, 40), (200, 40, 40))
    grey, untouched, n = 0, 0, 400
    for _ in range(n):
        crop = ((t(red)[2] * STD + MEAN) * 255).round()
        channels = crop.flatten(1).mean(1)
        grey += bool((channels.max() - channels.min()) < 1)
        untouched += bool(torch.allclose(channels, torch.tensor([200.0, 40.0, 40.0]), atol=1))
    assert 0.14 < grey / n < 0.26
    assert 0.1 < untouched / n < 0.22  # (1 - 0.8) * (1 - 0.2) = 0.16


# --- dataset, file listing, collate, loader --------------------------------------------------

def _folder(tmp_path, n=6):
    paths = []
    for i in range(n):
        sub = tmp_path / "images" / ("b" if i % 2 else "a")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:03d}.jpg"
        noise_image(60, 30, seed=i).save(path)
        paths.append(str(path))
    return sorted(paths)


def test_list_images_walks_in_sorted_order(tmp_path):
    root = tmp_path / "lup"
    for name in ("z/2.jpg", "a/10.PNG", "a/09.jpeg", "b/c/1.jpg", "0.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(4, 4).save(root / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (root / "notes.txt").write_text("not an image")
    found = [Path(p).relative_to(root).as_posix() for p in list_images(str(root))]
    assert found == ["0.jpg", "a/09.jpeg", "a/10.PNG", "b/c/1.jpg", "z/2.jpg"]
    assert len(list_images(str(root), keep=2)) == 2 and list_images(str(root), keep=0) == []
    assert [p.endswith(".PNG") for p in list_images(str(root), extensions=(".png",))] == [True]
    ranked = list_images(str(root), keep=["z/2.jpg", "0.jpg"])  # a CFS-style ranked list, in its order
    assert [p[len(str(root)) + 1:] for p in ranked] == ["z/2.jpg", "0.jpg"]
    with pytest.raises(FileNotFoundError, match="1 of the 2 listed images.*gone.jpg"):
        list_images(str(root), keep=["0.jpg", "gone.jpg"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(str(root), extensions=(".bmp",))
    with pytest.raises(ValueError, match="keep"):
        list_images(str(root), keep=-1)


def test_unlabelled_images_return_crops_and_name_a_bad_file(tmp_path):
    paths = _folder(tmp_path, 3)
    dataset = UnlabelledImages(paths, small(local_crops=2), seed=4)
    crops, index = dataset[1]
    assert index == 1 and [tuple(c.shape) for c in crops] == [(3, 32, 16)] * 2 + [(3, 16, 8)] * 2
    again, _ = dataset[(1, 0, 5)]
    other, _ = dataset[(1, 1, 5)]
    assert all(torch.equal(x, y) for x, y in zip(again, dataset[(1, 0, 5)][0]))  # keyed: repeats
    assert not all(torch.equal(x, y) for x, y in zip(again, other))  # another epoch: other crops
    image, _ = UnlabelledImages(paths)[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and len(UnlabelledImages(paths)) == 3
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(open(paths[0], "rb").read()[:100])
    with pytest.raises(OSError, match=str(bad)):
        UnlabelledImages([str(bad)], small())[0]
    assert "UnlabelledImages(3 images" in repr(dataset)


def test_collate_is_crop_major_per_crop_or_per_resolution():
    B = 3
    batch = [([torch.full((3, 4, 2), 10.0 * b + i) for i in range(2)]
              + [torch.full((3, 2, 1), 10.0 * b + i) for i in range(2, 6)], b + 7) for b in range(B)]
    per_crop, indices = MultiCropCollate()(batch)
    assert indices.tolist() == [7, 8, 9] and len(per_crop) == 6
    assert [tuple(t.shape) for t in per_crop] == [(B, 3, 4, 2)] * 2 + [(B, 3, 2, 1)] * 4
    assert per_crop[1][:, 0, 0, 0].tolist() == [1.0, 11.0, 21.0]  # crop 1 of every image
    groups, _ = MultiCropCollate(by_resolution=True)(batch)
    assert [tuple(t.shape) for t in groups] == [(2 * B, 3, 4, 2), (4 * B, 3, 2, 1)]
    # crop-major, as DINO's loss chunks it: all images' crop 0, then all images' crop 1, ...
    assert groups[0][:, 0, 0, 0].tolist() == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]
    assert torch.equal(groups[1], torch.cat(per_crop[2:]))
    assert all(torch.equal(g, c) for g, c in zip(groups[1].chunk(4), per_crop[2:]))
    with pytest.raises(ValueError, match="different numbers of crops"):
        MultiCropCollate()([batch[0], (batch[1][0][:3], 0)])


def test_seeded_multicrop_loader_ignores_workers(tmp_path):
    paths = _folder(tmp_path, 6)

    def batches(workers, epoch=0, seed=5, by_resolution=False):
        loader = make_multicrop_loader(paths, small(local_crops=2), 2, seed, workers,
                                       by_resolution=by_resolution)
        loader.dataset.set_epoch(epoch)
        return list(loader)

    zero = batches(0)
    assert len(zero) == 3 and all(len(crops) == 4 for crops, _ in zero)
    assert [tuple(t.shape) for t in zero[0][0]] == [(2, 3, 32, 16)] * 2 + [(2, 3, 16, 8)] * 2
    assert sorted(torch.cat([i for _, i in zero]).tolist()) == list(range(6))
    for (a, ia), (b, ib) in zip(zero, batches(2)):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(a, b))
    for other in (batches(0, epoch=1), batches(0, seed=6)):
        assert not all(torch.equal(x, y) for (a, _), (b, _) in zip(zero, other) for x, y in zip(a, b))
    grouped = batches(2, by_resolution=True)
    assert [tuple(t.shape) for t in grouped[0][0]] == [(4, 3, 32, 16), (4, 3, 16, 8)]
    assert torch.equal(grouped[0][0][0], torch.cat(zero[0][0][:2]))
    # a given sampler (DistributedSampler, a subset) is followed; drop_last drops the partial batch
    loader = make_multicrop_loader(paths, small(local_crops=1), 2, 5, 0, sampler=[4, 0, 2])
    assert [i.tolist() for _, i in loader] == [[4, 0]]
    unseeded = make_multicrop_loader(paths, small(local_crops=1), 4, num_workers=0, drop_last=False)
    assert sum(len(i) for _, i in unseeded) == 6
