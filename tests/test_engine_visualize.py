"""Pictures: ranked lists (layout, label lines, frame colours, same-id-same-camera removal,
distance / score kinds, digits), correspondences (indices equal an explicit argmax of the
materialised gated scores; panel titles), correspondence drawings (header, colour bar), file
names, the demo's pairs, and training curves (points at their real step, the run's name)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import transmatcher_fast
from transmatcher_fast.engine import visualize as vis
from transmatcher_fast.engine.visualize import COLORBAR_HEIGHT, LABEL_HEIGHT

CELL, PAD, BORDER = (40, 20), 4, 3
TILE_H, TILE_W = CELL[0] + 2 * BORDER, CELL[1] + 2 * BORDER


def expected_size(k: int, *, distances: bool, title: bool, ids: bool = False) -> tuple[int, int]:
    """(width, height) of a ranked-list row, from the documented layout."""
    width = 2 * PAD + TILE_W + (4 * PAD + k * TILE_W + (k - 1) * PAD if k else 0)
    height = 2 * PAD + TILE_H + LABEL_HEIGHT * (distances + title + ids)
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


def tile_x(i: int) -> int:
    """Left edge of gallery tile i of a ranked-list row."""
    return PAD + TILE_W + 4 * PAD + i * (TILE_W + PAD)


def has_text(img: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """Whether the box (x0, y0, x1, y1) holds dark (text) pixels on the white background."""
    a = np.asarray(img.convert("RGB").crop(box), dtype=np.int16)
    return bool((a.max(axis=2) < 128).any())


def test_ranked_list_image_layout_and_colours(images):
    correct = [True, False, True]
    img = vis.ranked_list_image(images[0], images[1:4], correct, distances=[0.1, 0.2, 0.3],
                                title="q", cell=CELL, pad=PAD, border=BORDER)
    assert img.size == expected_size(3, distances=True, title=True)
    top = PAD + LABEL_HEIGHT
    assert frame_pixel(img, PAD, top) == vis.QUERY_COLOR
    for i, ok in enumerate(correct):
        x0 = tile_x(i)
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


def test_ranked_list_image_label_lines(images):
    """One LABEL_HEIGHT line per thing shown under the tiles (values, ids), as documented; the
    value line holds the kind's text, the id line the labels; values= and distances= agree."""
    labels = ["pid 1 c0", "pid 2 c1", "pid 3 c0"]
    kw = dict(cell=CELL, pad=PAD, border=BORDER)
    for values, ids, title in [(True, True, True), (True, True, False), (False, True, False),
                               (True, False, True), (False, False, True)]:
        img = vis.ranked_list_image(images[0], images[1:4], [True, False, True],
                                    values=[0.1, 0.2, 0.3] if values else None,
                                    gallery_labels=labels if ids else None,
                                    title="q" if title else None, **kw)
        assert img.size == expected_size(3, distances=values, title=title, ids=ids)
    # query_label alone also adds the id line
    img = vis.ranked_list_image(images[0], images[1:3], [True, True], query_label="pid 1 c0", **kw)
    assert img.size == expected_size(2, distances=False, title=False, ids=True)

    both = vis.ranked_list_image(images[0], images[1:4], [True, False, True], values=[0.1, 0.2, 0.3],
                                 gallery_labels=labels, query_label="pid 9 c1", **kw)
    value_top = PAD + TILE_H
    id_top = value_top + LABEL_HEIGHT
    for x0 in [PAD] + [tile_x(i) for i in range(3)]:
        assert has_text(both, (x0, value_top, x0 + TILE_W, value_top + LABEL_HEIGHT))
        assert has_text(both, (x0, id_top, x0 + TILE_W, id_top + LABEL_HEIGHT))
    alias = vis.ranked_list_image(images[0], images[1:4], [True, False, True],
                                  distances=[0.1, 0.2, 0.3], gallery_labels=labels,
                                  query_label="pid 9 c1", **kw)
    assert np.array_equal(np.asarray(both), np.asarray(alias))
    # kind="score" writes "s=..." instead of "d=...": only the value line of the gallery tiles
    score = vis.ranked_list_image(images[0], images[1:4], [True, False, True], values=[0.1, 0.2, 0.3],
                                  kind="score", gallery_labels=labels, query_label="pid 9 c1", **kw)
    a, b = np.asarray(both), np.asarray(score)
    diff_rows = np.flatnonzero((a != b).any(axis=(1, 2)))
    assert diff_rows.size and value_top <= diff_rows.min() and diff_rows.max() < id_top
    diff_cols = np.flatnonzero((a != b).any(axis=(0, 2)))
    assert diff_cols.min() >= tile_x(0) - PAD  # the query's "query" is the same


def test_ranked_list_image_errors(images):
    with pytest.raises(ValueError, match="gallery_paths and correct"):
        vis.ranked_list_image(images[0], images[1:3], [True])
    with pytest.raises(ValueError, match="distances"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], distances=[1.0])
    with pytest.raises(ValueError, match="not both"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], distances=[1.0, 2.0],
                              values=[1.0, 2.0])
    with pytest.raises(ValueError, match="gallery_labels"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], gallery_labels=["pid 1 c0"])
    with pytest.raises(ValueError, match="kind"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], kind="similarity")
    with pytest.raises(ValueError, match="cell"):
        vis.ranked_list_image(images[0], images[1:3], [True, False], cell=(0, 10))


def test_format_values_gives_neighbours_distinct_text():
    assert vis.format_values([0.12341, 0.12346]) == ["0.1234", "0.1235"]  # 3 digits would not do
    assert vis.format_values([0.123401, 0.123406]) == ["0.12340", "0.12341"]
    assert vis.format_values([0.5, 0.25, 0.125]) == ["0.500", "0.250", "0.125"]  # 3 suffice
    assert vis.format_values([0.9, 0.9, 0.95]) == ["0.900", "0.900", "0.950"]  # equal read alike
    assert vis.format_values([0.99991, 0.99993]) == ["0.99991", "0.99993"]
    assert vis.format_values([100.0, 12.0]) == ["100", "12.0"]
    # general format: large and small values get an exponent
    assert vis.format_values([1.5e9, 2.5e9]) == ["1.50e+09", "2.50e+09"]
    assert vis.format_values([1.2345e-7, 1.2346e-7]) == ["1.2345e-07", "1.2346e-07"]
    assert vis.format_values([1234.5, 1236.5]) == ["1.23e+03", "1.24e+03"]
    assert vis.format_values([1234.51, 1234.56]) == ["1234.5", "1234.6"]
    # at most 8 significant digits: closer values still read alike
    assert vis.format_values([1.0, 1.0 + 1e-12]) == ["1.0000000", "1.0000000"]
    assert vis.format_values([1.0, 1.0 + 1e-12], max_digits=3) == ["1.00", "1.00"]
    assert vis.format_values([float("nan"), float("nan"), float("inf")]) == ["nan", "nan", "inf"]
    assert vis.format_values([]) == []
    rng = np.random.default_rng(0)
    values = np.sort(0.5 + rng.uniform(0, 1e-5, size=10))  # ten close, all different distances
    texts = vis.format_values(values)
    assert all(a != b for a, b in zip(texts, texts[1:]))
    assert all(float(a) < float(b) for a, b in zip(texts, texts[1:]))  # the order reads right
    with pytest.raises(ValueError, match="min_digits"):
        vis.format_values([1.0], min_digits=5, max_digits=4)


def test_value_labels_kind_header_and_id_label():
    assert vis.value_labels([0.12341, 0.12346]) == ["d=0.1234", "d=0.1235"]
    assert vis.value_labels([12.5, 3.25], kind="score") == ["s=12.5", "s=3.25"]
    assert vis.value_labels([0.5, 0.25]) == ["d=0.500", "d=0.250"]
    assert "distance" in vis.kind_header("distance") and "lower" in vis.kind_header("distance")
    assert "score" in vis.kind_header("score") and "higher" in vis.kind_header("score")
    assert vis.id_label(12, 3) == "pid 12 c3"
    assert vis.id_label(np.int64(-1), torch.tensor(0)) == "pid -1 c0"
    with pytest.raises(ValueError, match="kind"):
        vis.value_labels([1.0], kind="dist")


def test_file_names_follow_one_scheme():
    assert vis.ranked_list_name(3, 12, 8) == "ranked_q3_pid12.png"
    assert vis.ranked_list_name(3, 12, 1000) == "ranked_q003_pid12.png"  # 0..999: 3 digits
    assert vis.ranked_list_name(3, 12, 1001) == "ranked_q0003_pid12.png"
    assert vis.ranked_list_name(0, -1, 1) == "ranked_q0_pid-1.png"
    assert vis.overview_name(1, 1) == "ranked_lists.png"
    assert vis.overview_name(2, 9) == "ranked_lists_2.png"
    assert vis.overview_name(2, 10) == "ranked_lists_02.png"  # 1..10: 2 digits
    assert vis.correspondence_name(4, 7, 12, 9, 10, 100) == "correspondence_q4_pid7_g12_pid9.png"
    assert vis.correspondence_name(4, 7, 2, 7, 11, 101) == "correspondence_q04_pid7_g002_pid7.png"
    assert vis.TRAINING_CURVE_NAME == "training_curve.png"
    doc = " ".join(vis.__doc__.split())
    for pattern in ("ranked_q<query index>_pid<pid>.png", "ranked_lists.png",
                    "ranked_lists_<page>.png",
                    "correspondence_q<query index>_pid<pid>_g<gallery index>_pid<pid>.png",
                    "training_curve.png", "zero-padding rule"):
        assert pattern in doc, pattern


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
    # Scores: the highest first, the same removal, ties by gallery index, NaN last.
    score = np.array([9.0, 0.5, 0.4, 0.1, 0.4])
    assert vis.rank_gallery(score, 1, 0, pids, cams, kind="score").tolist() == [1, 2, 4]
    score[1] = np.nan
    assert vis.rank_gallery(score, 1, 0, pids, cams, kind="score").tolist() == [2, 4, 1]
    with pytest.raises(ValueError, match="kind"):
        vis.rank_gallery(dist, 1, 0, pids, cams, kind="similarity")
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
    row_size = expected_size(3, distances=True, title=True, ids=True)
    paths = vis.save_ranked_lists(out, query, gallery, arg, num_queries=2, topk=3, seed=1,
                                  cell=CELL, pad=PAD, border=BORDER)
    again = vis.save_ranked_lists(tmp_path / "again", query, gallery, arg, num_queries=2,
                                  topk=3, seed=1, cell=CELL, pad=PAD, border=BORDER)
    assert [p.name for p in paths] == [p.name for p in again]  # deterministic choice
    assert len(paths) == 3 and paths[-1].name == "ranked_lists.png"
    assert all(p.is_file() for p in paths)
    rows = paths[:-1]
    for p in rows:
        q, pid = p.stem.split("_")[1:]
        assert q.startswith("q") and pid.startswith("pid")
        assert int(pid[3:]) == query[int(q[1:])][1]
        assert p.name == vis.ranked_list_name(int(q[1:]), query[int(q[1:])][1], len(query))
        with Image.open(p) as im:
            assert im.size == row_size
    with Image.open(paths[-1]) as im:
        assert im.size == (row_size[0], len(rows) * row_size[1])
    # Query 0 drawn over all queries: gallery 0 never appears, the rest by distance.
    full = vis.save_ranked_lists(tmp_path / "all", query, gallery, arg, num_queries=3, topk=4,
                                 cell=CELL, pad=PAD, border=BORDER)
    assert [p.name for p in full] == ["ranked_q0_pid1.png", "ranked_q1_pid2.png",
                                      "ranked_q2_pid3.png", "ranked_lists.png"]
    ranked = vis.rank_gallery(dist[0], 1, 0, [g[1] for g in gallery], [g[2] for g in gallery])
    assert 0 not in ranked.tolist()
    assert ranked.tolist() == [i for i in np.argsort(dist[0], kind="stable").tolist() if i != 0]
    with Image.open(full[0]) as im:  # 4 candidates in the top-k pair, one excluded: 3 left
        assert im.size == expected_size(4 if form == "dense" else 3, distances=True, title=True,
                                        ids=True)
    # Without values / ids the rows lose those lines.
    bare = vis.save_ranked_lists(tmp_path / "bare", query, gallery, arg, num_queries=1, topk=3,
                                 show_distances=False, show_ids=False, cell=CELL, pad=PAD,
                                 border=BORDER)
    with Image.open(bare[0]) as im:
        assert im.size == expected_size(3, distances=False, title=True)


def test_save_ranked_lists_of_scores(tmp_path, images):
    """kind="score": the highest score comes first, and the rows read "s=" (differ in pixels
    from the same values drawn as distances only in the value line)."""
    query, gallery = _items(images)
    dist = np.random.default_rng(3).uniform(0.2, 1.0, size=(3, 5))
    score = -dist  # the same order
    kw = dict(num_queries=3, topk=3, cell=CELL, pad=PAD, border=BORDER)
    by_dist = vis.save_ranked_lists(tmp_path / "d", query, gallery, dist, **kw)
    by_score = vis.save_ranked_lists(tmp_path / "s", query, gallery, score, kind="score", **kw)
    assert [p.name for p in by_dist] == [p.name for p in by_score]
    for a, b in zip(by_dist[:3], by_score[:3]):
        with Image.open(a) as ia, Image.open(b) as ib:
            x, y = np.asarray(ia.convert("RGB")), np.asarray(ib.convert("RGB"))
        tiles = slice(PAD + LABEL_HEIGHT, PAD + LABEL_HEIGHT + TILE_H)
        assert np.array_equal(x[tiles], y[tiles])  # same images in the same order
        ids = slice(PAD + LABEL_HEIGHT + TILE_H + LABEL_HEIGHT, None)
        assert np.array_equal(x[ids], y[ids])  # same pids and cameras
        assert not np.array_equal(x, y)  # titles and values differ
    with pytest.raises(ValueError, match="kind"):
        vis.save_ranked_lists(tmp_path, query, gallery, dist, kind="similarity")


def test_save_ranked_lists_paginates_the_overview(tmp_path, images):
    """Many queries: the overview is split into pages of at most rows_per_page rows (so a
    1000-query run does not write one giant PNG); pages hold the rows in query order."""
    gallery = [(images[i % 8], i % 4, i % 2) for i in range(6)]
    query = [(images[i % 8], i % 4, (i + 1) % 2) for i in range(7)]
    dist = np.random.default_rng(2).uniform(0.1, 1.0, size=(7, 6))
    row_w, row_h = expected_size(2, distances=True, title=True, ids=True)
    paths = vis.save_ranked_lists(tmp_path / "paged", query, gallery, dist, num_queries=7, topk=2,
                                  cell=CELL, pad=PAD, border=BORDER, rows_per_page=3)
    singles, pages = paths[:7], paths[7:]
    assert [p.name for p in singles] == [f"ranked_q{i}_pid{i % 4}.png" for i in range(7)]
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
    # The same padding rule for query indices: 12 queries are q00..q11, 12 pages 01..12.
    big = [(images[i % 8], i % 4, 1) for i in range(12)]
    paged = vis.save_ranked_lists(tmp_path / "ten", big, gallery, np.ones((12, 6)), num_queries=12,
                                  topk=1, cell=CELL, pad=PAD, border=BORDER, rows_per_page=1)
    assert [p.name for p in paged[:2]] == ["ranked_q00_pid0.png", "ranked_q01_pid1.png"]
    assert paged[11].name == "ranked_q11_pid3.png"
    assert [p.name for p in paged[12:14]] == ["ranked_lists_01.png", "ranked_lists_02.png"]
    assert paged[-1].name == "ranked_lists_12.png"
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
    assert [m["label"] for m in matches] == ["layer 1", "layer 2"]
    assert [(m["matcher"], m["layer"]) for m in matches] == [("TransMatcher", 1), ("TransMatcher", 2)]
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
    assert (matches[0]["label"], matches[0]["matcher"], matches[0]["layer"]) == ("QAConv", "QAConv", None)
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


def test_score_range_and_colorbar(match):
    pytest.importorskip("matplotlib")
    import matplotlib

    lo, hi = vis.score_range(match)
    assert (lo, hi) == (float(match["q_best"].min()), float(match["q_best"].max()))
    assert vis.score_range(match, "gallery") == (float(match["g_best"].min()),
                                                 float(match["g_best"].max()))
    assert vis.score_range({**match, "q_best": np.full(8, np.nan)}) is None
    with pytest.raises(ValueError, match="direction"):
        vis.score_range(match, "both")
    cmap = matplotlib.colormaps["viridis"]
    end_colours = [tuple(int(round(255 * c)) for c in cmap(x)[:3]) for x in (0.0, 1.0)]
    bar = vis.colorbar_image(100, (lo, hi))
    assert bar.size == (100, COLORBAR_HEIGHT + LABEL_HEIGHT)
    for y in (0, COLORBAR_HEIGHT - 1):
        assert (bar.getpixel((0, y)), bar.getpixel((99, y))) == tuple(end_colours)
    assert has_text(bar, (0, COLORBAR_HEIGHT, 30, bar.height))  # the lowest value, left
    assert has_text(bar, (70, COLORBAR_HEIGHT, 100, bar.height))  # the highest, right
    grey = vis.colorbar_image(100, None)
    assert grey.getpixel((0, 0)) == grey.getpixel((99, 0)) == (160, 160, 160)
    other = vis.colorbar_image(100, (lo, hi), cmap="magma")
    assert other.getpixel((99, 0)) == tuple(int(round(255 * c)) for c in
                                            matplotlib.colormaps["magma"](1.0)[:3])


def test_correspondence_header():
    assert vis.correspondence_header() == []
    lines = vis.correspondence_header(score=12.3456, distance=0.2254, same_identity=True,
                                      probe_label="query 0 pid 1 c0 a.jpg",
                                      gallery_label="gallery 3 pid 1 c1 b.jpg")
    assert lines == ["score 12.35 (distance 0.2254) - same identity",
                     "probe: query 0 pid 1 c0 a.jpg", "gallery: gallery 3 pid 1 c1 b.jpg"]
    assert vis.correspondence_header(same_identity=False) == ["different identity"]
    assert vis.correspondence_header(score=-3.0, same_identity=False) == \
        ["score -3.000 - different identity"]


def test_save_correspondences(tmp_path, images, match):
    pytest.importorskip("matplotlib")
    import matplotlib

    panels_w = 2 * 64 + vis.PANEL_GAP
    bar_h = COLORBAR_HEIGHT + LABEL_HEIGHT
    out = vis.save_correspondences(tmp_path / "sub" / "corr.png", images[0], images[1],
                                   [match, match], size=(64, 32), top=3)
    with Image.open(out) as im:
        assert im.size == (panels_w, LABEL_HEIGHT + 64 + bar_h)
        im = im.convert("RGB")
        # the colour bar strip under each panel, from the map's first colour to its last
        cmap = matplotlib.colormaps["viridis"]
        first, last = (tuple(int(round(255 * c)) for c in cmap(x)[:3]) for x in (0.0, 1.0))
        y = LABEL_HEIGHT + 64 + COLORBAR_HEIGHT // 2
        for x0 in (0, 64 + vis.PANEL_GAP):
            assert im.getpixel((x0, y)) == first and im.getpixel((x0 + 63, y)) == last
        assert has_text(im, (0, 0, 64, LABEL_HEIGHT))  # the panel's title
    plain = vis.save_correspondences(tmp_path / "plain.png", images[0], images[1], [match],
                                     size=(64, 32), colorbar=False)
    with Image.open(plain) as im:
        assert im.size == (64, LABEL_HEIGHT + 64)
    # Header: one line per thing given, above the panels; the panels stay where they were.
    headed = vis.save_correspondences(tmp_path / "headed.png", images[0], images[1],
                                      [match, match], size=(64, 32), top=3, score=1.5,
                                      same_identity=False, probe_label="q", gallery_label="g")
    with Image.open(headed) as im, Image.open(out) as body:
        assert im.width >= panels_w  # widened only when a header line is wider than the panels
        assert im.height == 3 * LABEL_HEIGHT + LABEL_HEIGHT + 64 + bar_h
        a = np.asarray(im.convert("RGB"))[3 * LABEL_HEIGHT:]
        assert np.array_equal(a[:, :panels_w], np.asarray(body.convert("RGB")))
        assert (a[:, panels_w:] == 255).all()
        for line in range(3):
            assert has_text(im, (0, line * LABEL_HEIGHT, panels_w, (line + 1) * LABEL_HEIGHT))
    one_line = vis.save_correspondences(tmp_path / "one.png", images[0], images[1], [match],
                                        size=(64, 64), score=1.5)
    with Image.open(one_line) as im:  # "score 1.50" fits the panel: as wide as the panel
        assert im.size == (128, LABEL_HEIGHT + LABEL_HEIGHT + 64 + bar_h)
    # A header wider than the panels widens the picture instead of being cut.
    wide = vis.save_correspondences(tmp_path / "wide.png", images[0], images[1], [match],
                                    size=(64, 32), probe_label="x" * 60)
    with Image.open(wide) as im:
        assert im.width > 64 and has_text(im, (im.width - 30, 0, im.width, LABEL_HEIGHT))
    # Titles come from the match: "QAConv" and "layer 1" draw differently; no label: by position.
    labels = {}
    for name, m in {"qaconv": match, "layer": {**match, "label": "layer 1"},
                    "unlabelled": {k: v for k, v in match.items() if k != "label"}}.items():
        path = vis.save_correspondences(tmp_path / f"{name}.png", images[0], images[1], [m],
                                        size=(64, 32))
        with Image.open(path) as im:
            labels[name] = np.asarray(im.convert("RGB"))[:LABEL_HEIGHT]
    assert not np.array_equal(labels["qaconv"], labels["layer"])
    assert np.array_equal(labels["layer"], labels["unlabelled"])
    with pytest.raises(ValueError, match="matches"):
        vis.save_correspondences(tmp_path / "x.png", images[0], images[1], [])
    with pytest.raises(ValueError, match="direction"):
        vis.save_correspondences(tmp_path / "x.png", images[0], images[1], [match], direction="up")


def _demo_evaluation(matcher, features, pids, cams, paths, *, topk=None):
    """An Evaluation of query = gallery = the given features (distances from the matcher)."""
    from transmatcher_fast.engine import matching
    from transmatcher_fast.engine.evaluate import Evaluation
    from transmatcher_fast.engine.features import Features

    items = [(p, int(i), int(c)) for p, i, c in zip(paths, pids, cams)]
    feats = Features(features, torch.tensor(pids), torch.tensor(cams), paths=list(paths))
    dist = matching.match(matcher, features, features, topk=topk)
    return Evaluation({}, dist, feats, feats, items, items)


@pytest.mark.parametrize("kind", ["qaconv", "transmatcher"])
def test_save_query_correspondences_draws_distinct_identities(tmp_path, images, kind, monkeypatch):
    """The demo's pairs: one query per identity (distinct pids), with its nearest correct gallery
    image (same pid, another camera) and its nearest wrong one; the header's score is the
    matcher's score of the pair; names follow the scheme."""
    pytest.importorskip("matplotlib")
    from transmatcher_fast.engine import demo, matching

    torch.manual_seed(0)
    if kind == "qaconv":
        matcher = transmatcher_fast.QAConv(num_features=8, height=4, width=2)
        features = torch.nn.functional.normalize(torch.randn(8, 8, 4, 2), dim=1)
    else:
        matcher = transmatcher_fast.TransMatcher(seq_len=8, d_model=8, num_decoder_layers=2,
                                                 dim_feedforward=16)
        features = torch.randn(8, 4, 2, 16)
    matcher.eval()
    pids = [5, 5, 5, 7, 7, 9, 9, 11]  # 11 has no correct match in another camera
    cams = [0, 0, 1, 0, 1, 0, 1, 0]
    evaluation = _demo_evaluation(matcher, features, pids, cams, images)
    calls = []
    real = vis.save_correspondences

    def spy(path, probe, gallery, matches, **kw):
        calls.append((path, probe, gallery, matches, kw))
        return real(path, probe, gallery, matches, **kw)

    monkeypatch.setattr(vis, "save_correspondences", spy)
    written = demo.save_query_correspondences(None, matcher, None, evaluation, tmp_path / "c", pairs=3)
    assert len(written) == 6 and all(p.is_file() for p in written)
    dist = evaluation.distances
    q_done = []
    for n, (path, probe, gallery, matches, kw) in enumerate(calls):
        qi = images.index(probe)
        gi = images.index(gallery)
        q_done.append(qi)
        correct = n % 2 == 0
        assert kw["same_identity"] is correct and (pids[gi] == pids[qi]) is correct
        if correct:
            assert cams[gi] != cams[qi]
            candidates = [g for g in range(8) if pids[g] == pids[qi] and cams[g] != cams[qi]]
        else:
            candidates = [g for g in range(8) if pids[g] != pids[qi]]
        assert gi == min(candidates, key=lambda g: float(dist[qi, g]))
        assert path.name == vis.correspondence_name(qi, pids[qi], gi, pids[gi], 8, 8)
        assert path.name == f"correspondence_q{qi}_pid{pids[qi]}_g{gi}_pid{pids[gi]}.png"
        with torch.no_grad():
            expected = float(matcher.match(features[qi:qi + 1], features[gi:gi + 1]))
        assert kw["score"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert kw["distance"] == pytest.approx(float(dist[qi, gi]), rel=1e-4, abs=1e-5)
        assert kw["probe_label"] == f"query {qi}, pid {pids[qi]} c{cams[qi]}, img{qi}.png"
        assert kw["gallery_label"] == f"gallery {gi}, pid {pids[gi]} c{cams[gi]}, img{gi}.png"
        assert [m["label"] for m in matches] == (["QAConv"] if kind == "qaconv"
                                                 else ["layer 1", "layer 2"])
    queries = q_done[::2]
    assert q_done[1::2] == queries
    assert [pids[q] for q in queries] == [5, 7, 9]  # distinct identities, in query order
    # Without negatives: only the correct pairs; pairs caps the identities; a top-k evaluation
    # picks within its lists.
    calls.clear()
    only = demo.save_query_correspondences(None, matcher, None, evaluation, tmp_path / "p", pairs=2,
                                           negatives=False)
    assert len(only) == 2 and all(kw["same_identity"] for *_, kw in calls)
    top = _demo_evaluation(matcher, features, pids, cams, images, topk=8)
    assert isinstance(top.distances, matching.TopK)
    calls.clear()
    again = demo.save_query_correspondences(None, matcher, None, top, tmp_path / "t", pairs=3)
    assert [p.name for p in again] == [p.name for p in written]


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


def _log_records(log_every: int = 3, steps_per_epoch: int = 5, epochs: int = 3, *,
                 epoch_steps: bool = True, eval_steps: bool = True) -> list[dict]:
    """A trainer-like log: step records every ``log_every`` global steps, an epoch record (with
    its real ``step``) and an eval record at the end of each epoch."""
    records = []
    for epoch in range(epochs):
        for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1):
            if step % log_every == 0:
                records.append({"kind": "step", "epoch": epoch, "step": step, "loss": 1.0 / step,
                                "acc": 0.1, "lr": 0.1})
        end = (epoch + 1) * steps_per_epoch
        records.append({"kind": "epoch", "epoch": epoch, "loss": 0.5, "acc": 0.5, "lr": 0.1,
                        **({"step": end} if epoch_steps else {})})
        records.append({"kind": "eval", "epoch": epoch, "mAP": 0.1 * epoch, "rank1": 0.2,
                        **({"step": end} if eval_steps else {})})
    return records


def test_training_curve_series_places_epochs_at_their_real_step():
    series = vis.training_curve_series(_log_records())
    assert series["x_label"] == "step"
    assert series["panels"]["loss"]["step"][0] == [3, 6, 9, 12, 15]
    # epochs end at steps 5, 10, 15 (not at the last logged step 3, 9, 15)
    assert series["panels"]["loss"]["epoch"] == ([5, 10, 15], [0.5, 0.5, 0.5])
    assert series["eval"]["mAP"][0] == [5, 10, 15]
    assert list(series["eval"]) == ["mAP", "rank1"]
    # Without their own step: at the last step logged in the epoch (the older logs' fallback).
    old = vis.training_curve_series(_log_records(epoch_steps=False, eval_steps=False))
    assert old["panels"]["acc"]["epoch"][0] == [3, 9, 15]
    assert old["eval"]["rank1"][0] == [3, 9, 15]
    # Epoch records with steps but no step records (log_every beyond the run): still steps.
    only_epochs = [r for r in _log_records() if r["kind"] != "step"]
    series = vis.training_curve_series(only_epochs)
    assert series["x_label"] == "step" and series["panels"]["lr"]["epoch"][0] == [5, 10, 15]
    # No step anywhere: completed epochs.
    bare = [{k: v for k, v in r.items() if k != "step"} for r in only_epochs]
    series = vis.training_curve_series(bare)
    assert series["x_label"] == "epochs completed"
    assert series["panels"]["loss"]["epoch"][0] == [1, 2, 3]
    assert series["eval"]["mAP"][0] == [1, 2, 3]
    # An epoch without step records and without its own step: estimated from the others.
    gap = [r for r in _log_records(log_every=1, epoch_steps=False, eval_steps=False)
           if not (r["kind"] == "step" and r["epoch"] == 1)]
    assert vis.training_curve_series(gap)["panels"]["loss"]["epoch"][0] == [5, 10.0, 15]


def test_run_name(tmp_path, monkeypatch):
    assert vis.run_name("runs/market_tm/log.jsonl") == "market_tm"
    assert vis.run_name(tmp_path / "duke_qaconv" / "log.jsonl") == "duke_qaconv"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert vis.run_name("log.jsonl") == "here"


def test_plot_training_curves_title(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "market_tm"
    run.mkdir()
    log = run / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in _log_records()) + "\n")
    pictures = {}
    for name, title in (("default", None), ("same", "market_tm"), ("other", "another run")):
        out = vis.plot_training_curves(log, tmp_path / f"{name}.png", title=title)
        with Image.open(out) as im:
            pictures[name] = np.asarray(im.convert("RGB"))
    assert np.array_equal(pictures["default"], pictures["same"])  # titled with the run's name
    rows = np.flatnonzero((pictures["default"] != pictures["other"]).any(axis=(1, 2)))
    assert rows.size and rows.max() < 40  # only the title differs
