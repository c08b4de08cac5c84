"""Dataset parsers on small generated folder trees: counts, relabelling, cameras, junk/distractor
handling and the error messages. Files are empty: the parsers only read names."""

import pytest

from transmatcher_fast.data import DatasetLayoutError, build_dataset, dataset_names
from transmatcher_fast.data.datasets import (CUHK03NPDetected, CUHK03NPLabeled, DukeMTMCreID,
                                             Market1501, MSMT17, PidCamFolder, RandPerson)


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
            "randperson", "folder"} <= set(dataset_names())
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
