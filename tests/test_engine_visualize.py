"""Pictures: ranked lists (layout, frame colours, same-id-same-camera removal), correspondences
(indices equal an explicit argmax of the materialised gated scores), correspondence drawings and
training curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import transmatcher_fast
from transmatcher_fast.engine import visualize as vis
from transmatcher_fast.engine.visualize import LABEL_HEIGHT

CELL, PAD, BORDER = (40, 20), 4, 3
TILE_H, TILE_W = CELL[0] + 2 * BORDER, CELL[1] + 2 * BORDER


def expected_size(k: int, *, distances: bool, title: bool) -> tuple[int, int]:
    """(width, height) of a ranked-list row, from the documented layout."""
    width = 2 * PAD + TILE_W + (4 * PAD + k * TILE_W + (k - 1) * PAD if k else 0)
    height = 2 * PAD + TILE_H + LABEL_HEIGHT * (distances + title)
    return width, height


@pytest.fixture
def images(tmp_path):
    """Eight small solid-colour 'person' images (no green/red/blue, so frames stand out)."""
    paths = []
    for i in range(8):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (16, 32), (100 + 10 * i, 100, 120)).save(p)
        paths.append(str(p))
    return paths


def frame_pixel(img: Image.Image, x0: int, top: int) -> tuple[int, int, int]:
    return img.getpixel((x0 + 1, top + 1))


def test_ranked_list_image_layout_and_colours(images):
    correct = [True, False, True]
    img = vis.ranked_list_image(images[0], images[1:4], correct, distances=[0.1, 0.2, 0.3],
                                title="q", cell=CELL, pad=PAD, border=BORDER)
    assert img.size == expected_size(3, distances=True, title=True)
    top = PAD + LABEL_HEIGHT
    assert frame_pixel(img, PAD, top) == vis.QUERY_COLOR
    for i, ok in enumerate(correct):
        x0 = PAD + TILE_W + 4 * PAD + i * (TILE_W + PAD)
        assert frame_pixel(img, x0, top) == (vis.CORRECT_COLOR if ok else vis.WRONG_COLOR)
        # bottom-right frame corner too, and the image itself inside the frame
        assert img.getpixel((x0 + TILE_W - 1, top + TILE_H - 1)) == frame_pixel(img, x0, top)
        assert img.getpixel((x0 + TILE_W // 2, top + TILE_H // 2)) not in (
            vis.CORRECT_COLOR, vis.WRONG_COLOR)
    plain = vis.ranked_list_image(images[0], images[1:3], [True, True], cell=CELL, pad=PAD,
                                  border=BORDER)
    assert plain.size == expected_size(2, distances=False, title=False)
    assert vis.ranked_list_image(images[0], [], [], cell=CELL, pad=PAD, border=BORDER).size == \
        expected_size(0, distances=False, title=False)


def test_ranked_list_image_errors(images):
    with pytest.raises(ValueError, match="gallery_paths and correct"):
        vis.ranked_list_image(images[0], images[1:3], [True])
    with pytest.raises(ValueError, match="distances"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], distances=[1.0])
    with pytest.raises(ValueError, match="cell"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], cell=(0, 10))


def test_rank_gallery_removes_same_id_same_camera():
    pids = np.array([1, 1, 2, 1, 3])
    cams = np.array([0, 1, 0, 0, 1])
    # Gallery 0 and 3 are the query's identity in the query's camera (0); 0 is the nearest.
    dist = np.array([0.0, 0.5, 0.4, 0.1, 0.4])
    ranked = vis.rank_gallery(dist, 1, 0, pids, cams, topk=10)
    assert ranked.tolist() == [2, 4, 1]  # tie 0.4: lower gallery index first
    assert vis.rank_gallery(dist, 1, 0, pids, cams, topk=2).tolist() == [2, 4]
    # The same through a top-k pair given in a shuffled order, with -1 padding.
    ranked = vis.rank_gallery(np.array([0.4, 0.0, 0.5, 0.4, 9.0]), 1, 0, pids, cams,
                              indices=np.array([4, 0, 1, 2, -1]), topk=10)
    assert ranked.tolist() == [2, 4, 1]
    with pytest.raises(ValueError, match="distances"):
        vis.rank_gallery(dist[:3], 1, 0, pids, cams)
    with pytest.raises(ValueError, match="indices"):
        vis.rank_gallery(dist[:2], 1, 0, pids, cams, indices=np.array([0, 7]))


def _items(images):
    query = [(images[0], 1, 0), (images[1], 2, 1), (images[2], 3, 0)]
    gallery = [(images[3], 1, 0),  # same id, same camera as query 0: excluded
               (images[4], 1, 1), (images[5], 2, 0), (images[6], 3, 1), (images[7], 2, 1)]
    return query, gallery


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_save_ranked_lists(tmp_path, images, form):
    query, gallery = _items(images)
    rng = np.random.default_rng(0)
    dist = rng.uniform(0.2, 1.0, size=(3, 5))
    dist[0, 0] = 0.0  # the excluded item is the nearest
    if form == "dense":
        arg = torch.from_numpy(dist)
    else:
        index = np.argsort(dist, axis=1)[:, :4]
        arg = (np.take_along_axis(dist, index, axis=1), index)
    out = tmp_path / form
    paths = vis.save_ranked_lists(out, query, gallery, arg, num_queries=2, topk=3, seed=1,
                                  cell=CELL, pad=PAD, border=BORDER)
    again = vis.save_ranked_lists(tmp_path / "again", query, gallery, arg, num_queries=2,
                                  topk=3, seed=1, cell=CELL, pad=PAD, border=BORDER)
    assert [p.name for p in paths] == [p.name for p in again]  # deterministic choice
    assert len(paths) == 3 and paths[-1].name == "ranked_lists.png"
    assert all(p.is_file() for p in paths)
    rows = paths[:-1]
    for p in rows:
        qi, pid = p.stem.split("_")[1:]
        assert int(pid[1:]) == query[int(qi)][1]
        with Image.open(p) as im:
            assert im.size == expected_size(3, distances=True, title=True)
    with Image.open(paths[-1]) as im:
        assert im.size == (expected_size(3, distances=True, title=True)[0],
                           len(rows) * expected_size(3, distances=True, title=True)[1])
    # Query 0 drawn over all queries: gallery 0 never appears, the rest by distance.
    full = vis.save_ranked_lists(tmp_path / "all", query, gallery, arg, num_queries=3, topk=4,
                                 cell=CELL, pad=PAD, border=BORDER)
    assert len(full) == 4 and full[0].name == "ranked_0_q1.png"
    ranked = vis.rank_gallery(dist[0], 1, 0, [g[1] for g in gallery], [g[2] for g in gallery])
    assert 0 not in ranked.tolist()
    assert ranked.tolist() == [i for i in np.argsort(dist[0], kind="stable").tolist() if i != 0]
    with Image.open(full[0]) as im:  # 4 candidates in the top-k pair, one excluded: 3 left
        assert im.size == expected_size(4 if form == "dense" else 3, distances=True, title=True)


def test_save_ranked_lists_paginates_the_overview(tmp_path, images):
    """Many queries: the overview is split into pages of at most rows_per_page rows (so a
    1000-query run does not write one giant PNG); pages hold the rows in query order."""
    gallery = [(images[i % 8], i % 4, i % 2) for i in range(6)]
    query = [(images[i % 8], i % 4, (i + 1) % 2) for i in range(7)]
    dist = np.random.default_rng(2).uniform(0.1, 1.0, size=(7, 6))
    row_w, row_h = expected_size(2, distances=True, title=True)
    paths = vis.save_ranked_lists(tmp_path / "paged", query, gallery, dist, num_queries=7, topk=2,
                                  cell=CELL, pad=PAD, border=BORDER, rows_per_page=3)
    singles, pages = paths[:7], paths[7:]
    assert [p.name for p in singles] == [f"ranked_{i}_q{i % 4}.png" for i in range(7)]
    assert [p.name for p in pages] == [f"ranked_lists_{i}.png" for i in (1, 2, 3)]
    assert not (tmp_path / "paged" / "ranked_lists.png").exists()
    for page, n_rows, first in zip(pages, (3, 3, 1), (0, 3, 6)):
        with Image.open(page) as im, Image.open(singles[first]) as row:
            assert im.size == (row_w, n_rows * row_h)
            # the page's first row is the first query of that page, pixel for pixel
            top = np.asarray(im.convert("RGB"))[:row_h]
            assert np.array_equal(top, np.asarray(row.convert("RGB")))
    # Page numbers are zero-padded when there are 10 or more pages; one page keeps the old name.
    many = vis.save_ranked_lists(tmp_path / "many", query, gallery, dist, num_queries=7, topk=2,
                                 cell=CELL, pad=PAD, border=BORDER, rows_per_page=1)
    assert [p.name for p in many[7:]] == [f"ranked_lists_{i}.png" for i in range(1, 8)]
    one = vis.save_ranked_lists(tmp_path / "one", query, gallery, dist, num_queries=7, topk=2,
                                cell=CELL, pad=PAD, border=BORDER, rows_per_page=7)
    assert [p.name for p in one[7:]] == ["ranked_lists.png"]
    with Image.open(one[-1]) as im:
        assert im.size == (row_w, 7 * row_h)
    big = [(images[i % 8], i % 4, 1) for i in range(12)]
    paged = vis.save_ranked_lists(tmp_path / "ten", big, gallery, np.ones((12, 6)), num_queries=12,
                                  topk=1, cell=CELL, pad=PAD, border=BORDER, rows_per_page=1)
    assert [p.name for p in paged[12:14]] == ["ranked_lists_01.png", "ranked_lists_02.png"]
    assert vis.OVERVIEW_ROWS_PER_PAGE == 50
    with pytest.raises(ValueError, match="rows_per_page"):
        vis.save_ranked_lists(tmp_path, query, gallery, dist, rows_per_page=0)


def test_save_ranked_lists_errors(tmp_path, images):
    query, gallery = _items(images)
    with pytest.raises(ValueError, match="dist_or_topk"):
        vis.save_ranked_lists(tmp_path, query, gallery, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="dist_or_topk"):
        vis.save_ranked_lists(tmp_path, query, gallery, (np.zeros((3, 2)), np.zeros((3, 3))))
    with pytest.raises(ValueError, match="query_items"):
        vis.save_ranked_lists(tmp_path, [], gallery, np.zeros((0, 5)))


def _explicit(probe, gallery, gate=None):
    """Materialised S[s, t] = <g[s], p[t]> * sigmoid(E[s, t]) and its argmaxes, in float64."""
    s = torch.einsum("td,sd->st", probe.double(), gallery.double())
    if gate is not None:
        s = s * torch.sigmoid(gate.double())
    return s, s.argmax(dim=0), s.argmax(dim=1)  # q_index[t], g_index[s]


def _check_against(match, s, q_index, g_index):
    np.testing.assert_array_equal(match["q_index"], q_index.numpy())
    np.testing.assert_array_equal(match["g_index"], g_index.numpy())
    np.testing.assert_allclose(match["q_best"], s.max(dim=0).values.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(match["g_best"], s.max(dim=1).values.numpy(), rtol=1e-5, atol=1e-6)


def test_correspondences_transmatcher(backend):
    torch.manual_seed(0)
    matcher = transmatcher_fast.TransMatcher(seq_len=8, d_model=16, num_decoder_layers=2,
                                             dim_feedforward=32)
    matcher.train()
    probe, gallery = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    matches = vis.correspondences(matcher, probe, gallery)
    assert matcher.training and all(m.training for m in matcher.modules())
    assert len(matches) == 2
    for n, (layer, match) in enumerate(zip(matcher.decoder.layers, matches)):
        assert (match["height"], match["width"]) == (4, 2)
        with torch.no_grad():
            p = layer.project(probe[..., 16 * n:16 * (n + 1)])[0]
            g = layer.project(gallery[..., 16 * n:16 * (n + 1)])[0]
        _check_against(match, *_explicit(p, g, layer.score_embed.detach()[0, 0]))
    matcher.eval()
    vis.correspondences(matcher, probe, gallery)
    assert not any(m.training for m in matcher.modules())
    for bad in (torch.randn(2, 4, 2, 32), torch.randn(1, 4, 2, 16), torch.randn(1, 2, 2, 32),
                torch.randn(1, 8, 32)):
        with pytest.raises(ValueError, match="probe_features"):
            vis.correspondences(matcher, bad, gallery)
    with pytest.raises(ValueError, match="same shape"):
        vis.correspondences(matcher, torch.randn(1, 2, 4, 32), gallery)
    with pytest.raises(TypeError, match="matcher"):
        vis.correspondences(torch.nn.Linear(2, 2), probe, gallery)


def test_correspondences_qaconv(backend):
    torch.manual_seed(1)
    matcher = transmatcher_fast.QAConv(num_features=16, height=4, width=2)
    probe = torch.nn.functional.normalize(torch.randn(1, 16, 4, 2), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(1, 16, 4, 2), dim=1)
    matches = vis.correspondences(matcher, probe, gallery)
    assert matcher.training and len(matches) == 1
    assert (matches[0]["height"], matches[0]["width"]) == (4, 2)
    _check_against(matches[0], *_explicit(probe.flatten(2)[0].t(), gallery.flatten(2)[0].t()))
    with pytest.raises(ValueError, match="probe_features"):
        vis.correspondences(matcher, torch.randn(1, 16, 2, 4), torch.randn(1, 16, 2, 4))


@pytest.fixture
def match():
    torch.manual_seed(2)
    matcher = transmatcher_fast.QAConv(num_features=8, height=4, width=2)
    f = [torch.nn.functional.normalize(torch.randn(1, 8, 4, 2), dim=1) for _ in range(2)]
    return vis.correspondences(matcher, *f)[0]


def _changed(a: Image.Image, b: Image.Image) -> int:
    return int((np.asarray(a, dtype=np.int16) != np.asarray(b, dtype=np.int16)).any(axis=2).sum())


def test_correspondence_image(images, match):
    pytest.importorskip("matplotlib")
    size = (64, 32)
    plain = Image.new("RGB", (64, 64))
    for x, path in ((0, images[0]), (32, images[1])):
        with Image.open(path) as im:
            plain.paste(im.convert("RGB").resize((32, 64), Image.Resampling.BILINEAR), (x, 0))
    all_lines = vis.correspondence_image(images[0], images[1], match, size=size)
    assert all_lines.size == (64, 64)
    nothing = vis.correspondence_image(images[0], images[1], match, size=size, top=0)
    assert _changed(nothing, plain) == 0
    few = vis.correspondence_image(images[0], images[1], match, size=size, top=2)
    assert 0 < _changed(few, plain) < _changed(all_lines, plain)
    backward = vis.correspondence_image(Image.open(images[0]), images[1], match, size=size,
                                        direction="gallery")
    assert _changed(backward, plain) > 0
    with pytest.raises(ValueError, match="direction"):
        vis.correspondence_image(images[0], images[1], match, direction="both")
    with pytest.raises(ValueError, match="q_index"):
        vis.correspondence_image(images[0], images[1], {**match, "q_index": match["q_index"][:3]})


def test_save_correspondences(tmp_path, images, match):
    pytest.importorskip("matplotlib")
    out = vis.save_correspondences(tmp_path / "sub" / "corr.png", images[0], images[1],
                                   [match, match], size=(64, 32), top=3)
    with Image.open(out) as im:
        assert im.size == (2 * 64 + vis.PANEL_GAP, 64 + LABEL_HEIGHT)
    with pytest.raises(ValueError, match="matches"):
        vis.save_correspondences(tmp_path / "x.png", images[0], images[1], [])


def test_plot_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "train.jsonl"
    lines = []
    for epoch in range(3):
        for i in range(4):
            step = epoch * 4 + i + 1
            loss = float("nan") if step == 5 else 1.0 / step
            lines.append({"kind": "step", "epoch": epoch, "step": step, "loss": loss,
                          "acc": step / 12, "lr": 0.1 * 0.5 ** epoch, "images_per_s": 100.0,
                          "time": float(step)})
        lines.append({"kind": "epoch", "epoch": epoch, "loss": 1.0 / (epoch + 1), "acc": 0.5,
                      "lr": 0.1 * 0.5 ** epoch, "seconds": 1.0, "images_per_s": 100.0})
        lines.append({"kind": "eval", "epoch": epoch, "mAP": 0.2 * epoch, "rank1": 0.3 * epoch})
    lines.append({"kind": "checkpoint", "path": "x"})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "step", "ep'  # torn last line
    log.write_text(text)
    assert "NaN" in text  # json writes the non-finite loss as NaN
    out = vis.plot_training_curves(log, tmp_path / "plots" / "curves.png")
    assert out.is_file() and out.stat().st_size > 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        vis.plot_training_curves(empty, tmp_path / "e.png")
    with pytest.raises(ValueError, match="missing.jsonl"):
        vis.plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "e.png")
    (tmp_path / "bad.jsonl").write_text('not json\n{"kind": "epoch", "epoch": 0, "loss": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        vis.plot_training_curves(tmp_path / "bad.jsonl", tmp_path / "e.png")
