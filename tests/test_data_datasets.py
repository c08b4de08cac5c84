"""Dataset parsers on small generated folder trees: counts, relabelling, cameras, views, test
protocols, junk/distractor handling and the error messages. Files are empty: the parsers only read
names."""

import warnings

import pytest

from transmatcher_fast.data import DatasetLayoutError, build_dataset, dataset_names
from transmatcher_fast.data.datasets import (CUHK03NPDetected, CUHK03NPLabeled, DukeMTMCreID,
                                             Market1501, MSMT17, OccludedDuke, PidCamFolder,
                                             RandPerson, VehicleID, VeRi776)


def touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def ids(items):
    return sorted({pid for _, pid, _ in items})


def cams(items):
    return sorted({c for _, _, c in items})


MARKET_TRAIN = ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s1_000551_01.jpg",
                "0010_c6s4_002202_01.jpg", "-1_c1s1_000001_00.jpg", "0000_c2s1_000002_00.jpg"]
MARKET_QUERY = ["0003_c1s1_000001_00.jpg", "0005_c4s2_000101_00.jpg"]
MARKET_GALLERY = ["0003_c2s1_000201_01.jpg", "0005_c5s3_000051_02.jpg", "0000_c1s1_000003_00.jpg",
                  "0000_c3s1_000004_00.jpg", "-1_c6s1_000005_00.jpg", "notes.txt"]


def make_market(root):
    touch(root / "bounding_box_train", MARKET_TRAIN)
    touch(root / "query", MARKET_QUERY)
    touch(root / "bounding_box_test", MARKET_GALLERY)
    return root


def test_market_counts_relabel_junk_and_distractors(tmp_path):
    data = Market1501(make_market(tmp_path / "market"))
    # junk (-1) dropped everywhere; distractors (0000) out of train, kept in the gallery as pid 0
    assert len(data.train) == 4 and ids(data.train) == [0, 1, 2]
    assert {(p.split("/")[-1], pid, c) for p, pid, c in data.train} == {
        ("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000301_01.jpg", 0, 1),
        ("0007_c3s1_000551_01.jpg", 1, 2), ("0010_c6s4_002202_01.jpg", 2, 5)}
    assert [(pid, c) for _, pid, c in data.query] == [(3, 0), (5, 3)]
    assert len(data.gallery) == 4 and ids(data.gallery) == [0, 3, 5] and cams(data.gallery) == [0, 1, 2, 4]
    assert all(p.startswith(str(tmp_path)) for p, _, _ in data.train + data.query + data.gallery)
    table = data.summary()
    assert "train    |     3 |        4 |         4" in table
    assert "gallery  |     3 |        4 |         4" in table
    assert data.num_train_ids == 3


def test_registry_and_distribution_folder_names(tmp_path):
    make_market(tmp_path / "Market-1501-v15.09.15")
    data = build_dataset("market1501", tmp_path)
    assert len(data.train) == 4 and data.root == tmp_path / "Market-1501-v15.09.15"
    assert type(build_dataset("Market", tmp_path)) is Market1501
    assert {"market1501", "dukemtmcreid", "cuhk03_np_detected", "cuhk03_np_labeled", "msmt17",
            "randperson", "folder", "occluded_duke", "occ_duke", "veri", "veri776",
            "vehicleid"} <= set(dataset_names())
    with pytest.raises(KeyError, match="unknown dataset 'viper'"):
        build_dataset("viper", tmp_path)


def test_duke(tmp_path):
    touch(tmp_path / "bounding_box_train", ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0005_c8_f0000001.jpg"])
    touch(tmp_path / "query", ["0009_c1_f0000002.jpg"])
    touch(tmp_path / "bounding_box_test", ["0009_c3_f0000003.jpg", "0011_c7_f0000004.jpg"])
    data = DukeMTMCreID(tmp_path)
    assert [(pid, c) for _, pid, c in data.train] == [(0, 1), (0, 4), (1, 7)]
    assert [(pid, c) for _, pid, c in data.query] == [(9, 0)]
    assert [(pid, c) for _, pid, c in data.gallery] == [(9, 2), (11, 6)]


@pytest.mark.parametrize("cls,subset", [(CUHK03NPDetected, "detected"), (CUHK03NPLabeled, "labeled")])
def test_cuhk03_np_reads_png(tmp_path, cls, subset):
    base = tmp_path / "cuhk03-np" / subset
    touch(base / "bounding_box_train", ["0001_c1_1.png", "0001_c2_2.png", "0003_c1_1.png", "0004_c1_1.jpg"])
    touch(base / "query", ["0100_c1_1.png"])
    touch(base / "bounding_box_test", ["0100_c2_1.png", "0101_c1_1.png", "0101_c2_1.png"])
    data = cls(tmp_path)
    assert [(pid, c) for _, pid, c in data.train] == [(0, 0), (0, 1), (1, 0)]  # the .jpg is ignored
    assert data.stats(data.gallery) == (2, 3, 2) and data.stats(data.query) == (1, 1, 1)
    # upstream's layout: the three folders directly in the root
    assert len(cls(base).train) == 3


def write_msmt(root, train_prefix="", version=("train", "test")):
    train_dir, test_dir = version
    (root / train_dir).mkdir(parents=True)
    (root / test_dir).mkdir()
    (root / "list_train.txt").write_text(
        f"{train_prefix}0000/0000_000_01_0303morning_0015_0.jpg 0\n"
        f"{train_prefix}0000/0000_001_05_0303morning_0016_0.jpg 0\n"
        f"{train_prefix}0001/0001_000_15_0303noon_0001_1.jpg 1\n")
    (root / "list_val.txt").write_text(f"{train_prefix}0002/0002_003_02_0303afternoon_0002_0.jpg 2\n\n")
    (root / "list_query.txt").write_text("0000/0000_000_03_0113morning_0001_0.jpg 0\n")
    (root / "list_gallery.txt").write_text("0000/0000_001_04_0113morning_0005_0.jpg 0\n"
                                           "0007/0007_000_14_0113noon_0001_0.jpg 7\n")


@pytest.mark.parametrize("prefix", ["", "train/"])
def test_msmt17_v1_list_files(tmp_path, prefix):
    write_msmt(tmp_path, prefix)
    data = MSMT17(tmp_path)
    assert [(pid, c) for _, pid, c in data.train] == [(0, 0), (0, 4), (1, 14), (2, 1)]  # train + val
    assert data.train[0][0] == str(tmp_path / "train/0000/0000_000_01_0303morning_0015_0.jpg")
    assert [(pid, c) for _, pid, c in data.query] == [(0, 2)]
    assert data.query[0][0].startswith(str(tmp_path / "test" / "0000"))
    assert [(pid, c) for _, pid, c in data.gallery] == [(0, 3), (7, 13)]
    combined = MSMT17(tmp_path, combine_all=True)  # MSMT_all: test ids become new train ids
    assert combined.stats(combined.train) == (5, 7, 7) and ids(combined.train) == [0, 1, 2, 3, 4]


def test_msmt17_v2_under_its_folder(tmp_path):
    write_msmt(tmp_path / "MSMT17_V2", version=("mask_train_v2", "mask_test_v2"))
    data = build_dataset("msmt17", tmp_path)
    assert len(data.train) == 4 and "mask_train_v2" in data.train[0][0]
    assert "mask_test_v2" in data.gallery[0][0]


def test_msmt17_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*list_train.txt.*expected layout"):
        MSMT17(tmp_path)
    write_msmt(tmp_path)
    (tmp_path / "list_query.txt").write_text("0000/0000_000_03_0113morning_0001_0.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"line 1 of .*list_query.txt"):
        MSMT17(tmp_path)
    (tmp_path / "list_query.txt").write_text("0000/query.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match=r"line 1 of .*list_query.txt: '0000/query.jpg 0'"):
        MSMT17(tmp_path)


def test_randperson(tmp_path):
    touch(tmp_path / "randperson_subset", ["000000_s00_c00_f000000.jpg", "000000_s00_c01_f000120.jpg",
                                           "000003_s02_c01_f000010.jpg", "000007_s10_c03_f000005.png"])
    data = RandPerson(tmp_path)
    # pid 0 is a real identity here; cameras get upstream's per-scene offsets
    assert [(pid, c) for _, pid, c in data.train] == [(0, 0), (0, 1), (1, 5), (2, 18)]
    assert data.query == [] and data.gallery == []
    touch(tmp_path / "randperson_subset", ["000009_s11_c00_f000000.jpg"])
    with pytest.raises(DatasetLayoutError, match="scene 11"):
        RandPerson(tmp_path)
    (tmp_path / "randperson_subset" / "000009_s11_c00_f000000.jpg").rename(
        tmp_path / "randperson_subset" / "person9.jpg")
    with pytest.raises(DatasetLayoutError, match=r"person9.jpg"):
        RandPerson(tmp_path)


def test_generic_folder(tmp_path):
    touch(tmp_path / "flat", ["12_c1_a.jpg", "12_c2_b.png", "30_c3.jpeg", "-1_c1_x.jpg", "0_c2_y.jpg"])
    flat = PidCamFolder(tmp_path / "flat")
    assert [(pid, c) for _, pid, c in flat.train] == [(0, 0), (0, 1), (1, 2)] and flat.query == []
    touch(tmp_path / "split" / "train", ["5_c0_a.jpg", "6_c1_a.jpg"])
    touch(tmp_path / "split" / "query", ["8_c0_a.jpg"])
    touch(tmp_path / "split" / "gallery", ["8_c1_a.jpg", "0_c0_a.jpg"])
    split = PidCamFolder(tmp_path / "split", cam_base=0)
    assert [(pid, c) for _, pid, c in split.train] == [(0, 0), (1, 1)]
    assert [(pid, c) for _, pid, c in split.gallery] == [(0, 0), (8, 1)]
    with pytest.raises(DatasetLayoutError, match=r"camera 0 \(cameras start at 1\)"):
        PidCamFolder(tmp_path / "split")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images in"):
        PidCamFolder(tmp_path / "empty")


def test_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as error:
        Market1501(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value) and "bounding_box_train" in str(error.value)
    touch(tmp_path / "market" / "bounding_box_train", ["0002_c1s1_000451_03.jpg"])
    with pytest.raises(DatasetLayoutError, match=r"missing .*market/query, .*market/bounding_box_test"):
        Market1501(tmp_path / "market")
    with pytest.raises(DatasetLayoutError, match="randperson_subset"):
        RandPerson(tmp_path / "market")


def test_unparsable_name_names_the_file(tmp_path):
    make_market(tmp_path)
    touch(tmp_path / "query", ["IMG_0001.jpg"])
    with pytest.raises(DatasetLayoutError, match=r"<pid>_c<cam> from the file name .*query/IMG_0001.jpg"):
        Market1501(tmp_path)


# --- camera / view counts and the default test protocol ------------------------------------------

def test_sie_counts_and_single_test_split_on_person_sets(tmp_path):
    market = Market1501(make_market(tmp_path / "market"))
    # cameras c1, c2, c3, c6 in train: the camera table covers ids 0..5
    assert market.num_train_cameras == 6 and market.num_train_views == 1
    assert market.train_views is None and market.query_views is None and market.gallery_views is None
    assert market.views_of(market.train) is None and not market.has_views
    assert market.test_splits() == [(market.query, market.gallery)]
    assert market.test_splits(trials=10, seed=3) == [(market.query, market.gallery)]  # fixed split
    with pytest.raises(ValueError, match="trials"):
        market.test_splits(trials=0)
    assert "train camera ids: 6, view ids: 1 (no view labels)" in market.summary()
    write_msmt(tmp_path / "msmt")
    assert MSMT17(tmp_path / "msmt").num_train_cameras == 15
    touch(tmp_path / "rp" / "randperson_subset", ["000000_s00_c00_f000000.jpg", "000007_s10_c03_f000005.jpg"])
    assert RandPerson(tmp_path / "rp").num_train_cameras == 19
    assert PidCamFolder(tmp_path / "market" / "query").num_train_cameras == 4


# --- Occluded-Duke ------------------------------------------------------------------------------

def test_occluded_duke(tmp_path):
    base = tmp_path / "Occluded_Duke"
    touch(base / "bounding_box_train", ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg",
                                        "0005_c8_f0000001.jpg", "0003_c1_f0000009.jpg"])
    touch(base / "query", ["0009_c1_f0000002.jpg"])
    touch(base / "bounding_box_test", ["0009_c3_f0000003.jpg", "0011_c7_f0000004.jpg"])
    for key in ("occluded_duke", "occ_duke", "Occ_Duke"):
        assert type(build_dataset(key, tmp_path)) is OccludedDuke
    data = build_dataset("occ_duke", tmp_path)
    assert data.root == base
    assert [(pid, c) for _, pid, c in data.train] == [(0, 1), (0, 4), (1, 0), (2, 7)]  # 1, 1, 3, 5
    assert [(pid, c) for _, pid, c in data.query] == [(9, 0)]
    assert [(pid, c) for _, pid, c in data.gallery] == [(9, 2), (11, 6)]
    assert data.num_train_cameras == 8 and data.num_train_views == 1 and data.train_views is None
    (base / "query" / "0009_c1_f0000002.jpg").unlink()
    (base / "query").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*query.*Occluded_Duke"):
        OccludedDuke(tmp_path)


# --- VeRi-776 -------------------------------------------------------------------------------------

VERI_TRAIN = {"0001_c001_00016450_0.jpg": 0, "0001_c002_00016460_0.jpg": 4, "0003_c011_00000010_0.jpg": 2,
              "0005_c020_00030010_1.jpg": 7}
VERI_QUERY = {"0002_c002_00030600_0.jpg": 3}
VERI_TEST = {"0002_c002_00030600_0.jpg": 3, "0002_c003_00084325_0.jpg": 1, "0007_c019_00012010_0.jpg": 5}


def keypoint_lines(folder, views):
    return "".join(f"VeRi/{folder}/{name} " + " ".join(["-1"] * 40) + f" {view}\n" for name, view in views.items())


def make_veri(root, keypoints=True, leave_out=()):
    touch(root / "image_train", VERI_TRAIN)
    touch(root / "image_query", VERI_QUERY)
    touch(root / "image_test", VERI_TEST)
    if keypoints:
        (root / "keypoint_train.txt").write_text(
            keypoint_lines("image_train", {n: v for n, v in VERI_TRAIN.items() if n not in leave_out}))
        (root / "keypoint_test.txt").write_text(  # upstream's test file lists image_test paths only
            keypoint_lines("image_test", {n: v for n, v in VERI_TEST.items() if n not in leave_out}))
    return root


def test_veri_parsing_and_views_from_keypoint_files(tmp_path):
    make_veri(tmp_path / "VeRi")
    for key in ("veri", "veri776", "VeRi"):
        assert type(build_dataset(key, tmp_path)) is VeRi776
    data = VeRi776(tmp_path)
    assert data.root == tmp_path / "VeRi"
    assert [(p.split("/")[-1], pid, c) for p, pid, c in data.train] == [
        ("0001_c001_00016450_0.jpg", 0, 0), ("0001_c002_00016460_0.jpg", 0, 1),
        ("0003_c011_00000010_0.jpg", 1, 10), ("0005_c020_00030010_1.jpg", 2, 19)]
    assert [(pid, c) for _, pid, c in data.query] == [(2, 1)]
    assert [(pid, c) for _, pid, c in data.gallery] == [(2, 1), (2, 2), (7, 18)]
    assert all(len(item) == 3 for item in data.train + data.query + data.gallery)
    # views by basename, aligned with the items; the query's come from keypoint_test.txt
    assert data.train_views == [0, 4, 2, 7] and data.query_views == [3] and data.gallery_views == [3, 1, 5]
    assert data.num_train_cameras == 20 and data.num_train_views == 8 and data.has_views
    query, gallery = data.test_splits()[0]
    assert data.views_of(query) == [3] and data.views_of(gallery) == [3, 1, 5]
    with pytest.raises(KeyError, match="no view label for /elsewhere.jpg"):
        data.views_of([("/elsewhere.jpg", 1, 0)])
    table = data.summary()
    assert "train camera ids: 20, view ids: 8" in table and "views from " in table and "keypoint_train.txt" in table
    assert data.missing_views_report == {}


def test_veri_keypoint_file_locations(tmp_path):
    root = make_veri(tmp_path / "veri")
    (root / "datasets").mkdir()
    for name in ("keypoint_train.txt", "keypoint_test.txt"):
        (root / name).rename(root / "datasets" / name)
    assert VeRi776(root).train_views == [0, 4, 2, 7]  # <root>/datasets/, upstream's place
    elsewhere = tmp_path / "transreid" / "datasets"
    elsewhere.mkdir(parents=True)
    for name in ("keypoint_train.txt", "keypoint_test.txt"):
        (root / "datasets" / name).rename(elsewhere / name)
    assert VeRi776(root).train_views is None
    assert VeRi776(root, keypoint_dir=elsewhere).gallery_views == [3, 1, 5]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"missing .*empty/keypoint_train.txt, .*empty/keypoint_test.txt"):
        VeRi776(root, keypoint_dir=tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match=r"keypoint folder .*absent does not exist"):
        VeRi776(root, keypoint_dir=tmp_path / "absent")
    (elsewhere / "keypoint_train.txt").rename(root / "keypoint_train.txt")
    with pytest.raises(DatasetLayoutError, match=r"found .*keypoint_train.txt but no keypoint_test.txt"):
        VeRi776(root)


def test_veri_without_keypoint_files_views_are_unknown(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning or an error
        data = VeRi776(make_veri(tmp_path, keypoints=False), missing_views="error")
    assert len(data.train) == 4 and len(data.gallery) == 3
    assert data.train_views is None and data.query_views is None and data.num_train_views == 1
    assert "views unknown: no keypoint_train.txt / keypoint_test.txt in " in data.summary()


def test_veri_images_without_a_view_are_reported(tmp_path):
    # the only image of train id 0003 and one gallery image have no view
    leave_out = ("0003_c011_00000010_0.jpg", "0007_c019_00012010_0.jpg")
    root = make_veri(tmp_path, leave_out=leave_out)
    with pytest.warns(UserWarning, match=r"skipped 2 images without a view .*train 1: 0003_c011_00000010_0.jpg"
                                         r"; gallery 1: 0007_c019_00012010_0.jpg"):
        data = VeRi776(root)  # missing_views="skip" is the default, upstream's behaviour
    assert [(pid, c) for _, pid, c in data.train] == [(0, 0), (0, 1), (1, 19)]  # relabelled after the skip
    assert data.train_views == [0, 4, 7] and data.gallery_views == [3, 1] and len(data.gallery) == 2
    assert data.missing_views_report == {"train": ["0003_c011_00000010_0.jpg"], "gallery": ["0007_c019_00012010_0.jpg"]}
    assert "skipped 2 images without a view" in data.summary()
    with pytest.raises(DatasetLayoutError, match=r"2 images without a view .*0003_c011.*missing_views='skip'"):
        VeRi776(root, missing_views="error")
    with pytest.raises(ValueError, match="missing_views must be 'skip' or 'error'"):
        VeRi776(root, missing_views="drop")


def test_veri_many_missing_views_list_the_first_names(tmp_path):
    root = make_veri(tmp_path)
    touch(root / "image_test", [f"0100_c001_{i:08d}_0.jpg" for i in range(7)])
    with pytest.warns(UserWarning, match=r"gallery 7: 0100_c001_00000000_0.jpg, .*00000004_0.jpg, \.\.\. 2 more"):
        data = VeRi776(root)
    assert len(data.missing_views_report["gallery"]) == 7


def test_veri_errors(tmp_path):
    root = make_veri(tmp_path)
    (root / "keypoint_test.txt").write_text("VeRi/image_test/0002_c002_00030600_0.jpg 1 2 x\n")
    with pytest.raises(DatasetLayoutError, match=r"line 1 of .*keypoint_test.txt"):
        VeRi776(root)
    (root / "keypoint_test.txt").write_text("\nVeRi/image_test/0002_c002_00030600_0.jpg 1 2 9\n")
    with pytest.raises(DatasetLayoutError, match=r"view 9 \(views are 0..7\) on line 2 of .*keypoint_test.txt"):
        VeRi776(root)
    for name in VERI_QUERY:
        (root / "image_query" / name).unlink()
    (root / "image_query").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*image_query.*expected layout"):
        VeRi776(root)


# --- VehicleID ------------------------------------------------------------------------------------

VEHICLEID_TEST = {800: {100: 4, 200: 1, 300: 3}, 1600: {100: 4, 200: 1, 300: 3, 400: 2, 500: 5},
                  2400: {100: 4, 200: 1, 300: 3, 400: 2, 500: 5, 600: 6, 700: 2}}


def make_vehicleid(root, sizes=(800, 1600, 2400)):
    split = root / "train_test_split"
    split.mkdir(parents=True)
    (root / "image").mkdir()
    (split / "train_list.txt").write_text("0000010 10\n0000011 10\n0000250 25\n\n0000003 3\n")
    for size in sizes:
        lines = [f"{pid:03d}{n:04d} {pid}" for pid, count in VEHICLEID_TEST[size].items() for n in range(count)]
        (split / f"test_list_{size}.txt").write_text("\n".join(lines) + "\n")
    return root


def by_pid(items):
    groups = {}
    for path, pid, cam in items:
        groups.setdefault(pid, []).append(path)
    return groups


@pytest.mark.parametrize("size", [800, 1600, 2400])
def test_vehicleid_lists_and_protocol(tmp_path, size):
    make_vehicleid(tmp_path / "VehicleID_V1.0")
    data = build_dataset("vehicleid", tmp_path, test_size=size)
    assert type(data) is VehicleID and data.root == tmp_path / "VehicleID_V1.0"
    # train: every image, ids relabelled in pid order (3, 10, 25), camera a dummy 0
    assert [(p.split("/")[-1], pid, c) for p, pid, c in data.train] == [
        ("0000010.jpg", 1, 0), ("0000011.jpg", 1, 0), ("0000250.jpg", 2, 0), ("0000003.jpg", 0, 0)]
    assert data.train[0][0] == str(tmp_path / "VehicleID_V1.0" / "image" / "0000010.jpg")
    assert data.num_train_cameras == 1 and data.num_train_views == 1 and data.train_views is None
    counts = VEHICLEID_TEST[size]
    assert data.stats(data.gallery) == (len(counts), len(counts), 1) and {c for *_, c in data.gallery} == {1}
    assert len(data.query) == sum(counts.values()) - len(counts) and {c for *_, c in data.query} == {0}
    assert all(len(item) == 3 for item in data.train + data.query + data.gallery)
    splits = data.test_splits()
    assert len(splits) == 10 and splits[0] == (data.query, data.gallery)  # the first draw of seed 0
    every_image = sorted(p for paths in by_pid(data.query + data.gallery).values() for p in paths)
    for query, gallery in splits:
        assert sorted(by_pid(gallery)) == sorted(counts) and all(len(v) == 1 for v in by_pid(gallery).values())
        assert sorted(p for p, _, _ in query + gallery) == every_image
        assert not {p for p, _, _ in query} & {p for p, _, _ in gallery}
        assert {pid for _, pid, _ in query} == {pid for pid, n in counts.items() if n > 1}  # test pids as given
    assert len({tuple(g) for _, g in splits}) > 1  # the draws differ from each other
    assert "10 random splits" in data.summary() and f"test_list_{size}.txt" in data.summary()


def test_vehicleid_trials_are_seeded(tmp_path):
    data = VehicleID(make_vehicleid(tmp_path))
    assert data.test_splits(seed=1) == data.test_splits(seed=1)
    assert data.test_splits(seed=1) != data.test_splits(seed=2)
    assert data.test_splits(trials=3, seed=1) == data.test_splits(seed=1)[:3]
    assert VehicleID(tmp_path, seed=5).test_splits(trials=1, seed=5)[0] == \
        (VehicleID(tmp_path, seed=5).query, VehicleID(tmp_path, seed=5).gallery)
    assert len(data.test_splits(trials=1)) == 1
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="trials"):
            data.test_splits(trials=bad)
    assert "(published: 13164 / 800)" in data.summary()


def test_vehicleid_errors(tmp_path):
    root = make_vehicleid(tmp_path, sizes=(800,))
    with pytest.raises(ValueError, match=r"test_size must be one of \(800, 1600, 2400\)"):
        VehicleID(root, test_size=1000)
    with pytest.raises(DatasetLayoutError, match=r"(?s)missing .*train_test_split/test_list_1600.txt.*expected layout"):
        VehicleID(root, test_size=1600)
    (root / "train_test_split" / "test_list_800.txt").write_text("0000001 1\n0000002\n")
    with pytest.raises(DatasetLayoutError, match=r"line 2 of .*test_list_800.txt: '0000002'"):
        VehicleID(root)
    (root / "train_test_split" / "test_list_800.txt").write_text("\n")
    with pytest.raises(DatasetLayoutError, match=r"test_list_800.txt lists no images"):
        VehicleID(root)
    (root / "image").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"missing .*/image\b"):
        VehicleID(root)
    with pytest.raises(DatasetLayoutError, match=r"folder .*nowhere does not exist"):
        VehicleID(tmp_path / "nowhere")
