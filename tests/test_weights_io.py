"""weights_io: the one module that reads and writes weights files."""

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from transmatcher_fast import weights_io
from transmatcher_fast.engine import checkpoint
from transmatcher_fast.weights_io import WeightsFileError

PACKAGE = Path(weights_io.__file__).parent


def _write_marker(path):
    Path(path).write_text("code ran")


class _Payload:
    """Unpickling this calls ``_write_marker``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (str(self.marker),)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker.txt"
    for name, save in {"zip": lambda obj, f: torch.save(obj, f),
                       "legacy": lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False),
                       "plain pickle": lambda obj, f: Path(f).write_bytes(pickle.dumps(obj, protocol=2))}.items():
        path = tmp_path / f"{name}.pt"
        save({"weight": torch.ones(2), "payload": _Payload(marker)}, path)
        with pytest.raises(WeightsFileError, match="could run code") as info:
            weights_io.load(path)
        assert info.value.kind == "code" and str(path) in str(info.value), name
        assert not marker.exists(), name
    # The same file through the engine and the models' loaders.
    with pytest.raises(ValueError):
        checkpoint.load(tmp_path / "zip.pt")
    from transmatcher_fast.models.resnet import read_state_dict

    with pytest.raises(ValueError, match="could run code"):
        read_state_dict(str(tmp_path / "zip.pt"))
    assert not marker.exists()


def test_reads_our_checkpoints_bit_for_bit(tmp_path):
    state = {"model": {"w": torch.randn(3, 4), "b": torch.arange(5)}, "epoch": 2,
             "config": {"method": "transmatcher", "lr": 0.1}, "rng": {"python": (3, (1, 2), None)}}
    path = checkpoint.save_atomic(state, tmp_path / "checkpoint.pt")
    for loaded in (weights_io.load(path), weights_io.load(path, mmap=True), checkpoint.load(path)):
        assert loaded["epoch"] == 2 and loaded["config"] == state["config"]
        for key, value in state["model"].items():
            assert torch.equal(loaded["model"][key], value) and loaded["model"][key].dtype == value.dtype
    # The legacy (non-zip) format reads too; mmap is not tried on it.
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(weights_io.load(legacy, mmap=True)["model"]["w"], state["model"]["w"])


def test_upstream_layouts_unwrap_and_strip(tmp_path):
    weights = {"conv.weight": torch.randn(2, 3), "bn.running_mean": torch.randn(2)}
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    files = {"bare": weights, "module": prefixed, "state_dict": {"state_dict": prefixed, "epoch": 3},
             "model": {"model": weights, "optimizer": {}}}
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pth")
        state = weights_io.strip_prefix(weights_io.unwrap(weights_io.load(tmp_path / f"{name}.pth")))
        assert state.keys() == weights.keys(), name
        assert all(torch.equal(state[k], v) for k, v in weights.items()), name
    # DINO's teacher: DistributedDataParallel's prefixes dropped, the backbone selected.
    teacher = {"module.backbone.pos_embed": torch.randn(1, 3, 4), "module.head.last_layer.weight": torch.randn(2, 4)}
    torch.save({"teacher": teacher, "student": {}, "epoch": 1}, tmp_path / "dino.pth")
    state = weights_io.unwrap(weights_io.load(tmp_path / "dino.pth"), ("teacher",))
    assert sorted(state) == ["backbone.pos_embed", "head.last_layer.weight"]
    assert torch.equal(weights_io.select(state, "backbone.")["pos_embed"], teacher["module.backbone.pos_embed"])
    # A prefix that may begin a real name is dropped only when every key has it.
    mixed = {"base.conv1.weight": 1, "fc.weight": 2}
    assert weights_io.strip_prefix(mixed, "base.", only_if_all=True) == mixed
    assert weights_io.strip_prefix({"base.a": 1}, "base.", only_if_all=True) == {"a": 1}


def test_safetensors_when_installed(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    weights = {"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    safetensors.save_file(weights, str(path))
    assert weights_io.file_format(path) == "safetensors"
    loaded = weights_io.load(path)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    cases = {"empty.pt": (b"", "empty", "the file is empty"),
             "log.jsonl": (b'{"epoch": 1}\n', "text", "is a JSON file, not a checkpoint"),
             "config.yaml": (b"lr: 0.1\n", "text", "is a text file, not a checkpoint"),
             "noise.bin": (bytes(range(256)) * 4, "format", "is not a PyTorch checkpoint")}
    for name, (content, kind, text) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsFileError) as info:
            weights_io.load(tmp_path / name)
        assert info.value.kind == kind and info.value.problem.startswith(text), name
        assert str(info.value) == f"{tmp_path / name}: {info.value.problem}"
    good = checkpoint.save_atomic({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:2048])
    with pytest.raises(WeightsFileError, match="truncated or corrupt") as info:
        weights_io.load(tmp_path / "cut.pt")
    assert info.value.kind == "corrupt"
    with pytest.raises(FileNotFoundError, match="no such file"):
        weights_io.load(tmp_path / "absent.pt")


def test_shape_fit_error_names_file_key_and_both_shapes(tmp_path):
    model = nn.Linear(4, 3)
    own = model.state_dict()
    state = {"weight": torch.zeros(3, 5), "extra": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        weights_io.load_exactly(model, state, tmp_path / "w.pth", hint="a Linear(4, 3)")
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'w.pth'}: the weights do not fit the model (a Linear(4, 3)): ")
    assert "missing keys (1): bias" in text and "unexpected keys (1): extra" in text
    assert "weight: file (3, 5) vs model (3, 4)" in text
    assert torch.equal(model.weight, own["weight"])  # nothing was loaded
    weights_io.check_fits("w.pth", own, {"weight": own["weight"]}, optional=("bias",))  # may be absent


def test_atomic_write_leaves_no_temporary_on_an_exception(tmp_path):
    path = tmp_path / "out" / "file.bin"
    weights_io.atomic_write(path, lambda f: f.write(b"old"))

    def fail(file):
        file.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        weights_io.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(path.parent) == ["file.bin"]
    assert weights_io.temporaries(path) == []
    fixed = tmp_path / "out" / ".file.bin.tmp"
    with pytest.raises(RuntimeError):
        weights_io.atomic_write(path, fail, temporary=fixed)
    assert not fixed.exists() and path.read_bytes() == b"old"
    weights_io.atomic_write(path, lambda f: f.write("new\n"), "w", temporary=fixed)
    assert path.read_text() == "new\n" and not fixed.exists()


def _calls_torch_load(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.Attribute) and node.attr == "load"
               and isinstance(node.value, ast.Name) and node.value.id == "torch" for node in ast.walk(tree))


def test_only_weights_io_calls_torch_load():
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if _calls_torch_load(p))
    assert callers == ["weights_io.py"]


def test_weights_io_imports_nothing_of_the_package():
    """Every layer (models, methods, engine, cli) imports it, so it must sit below them all."""
    tree = ast.parse((PACKAGE / "weights_io.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if m is None or m.startswith("transmatcher_fast")]
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomically_written_file_has_the_permissions_open_would_give(tmp_path, umask):
    """A checkpoint written through a private temporary is not left private (0600) on a shared
    machine: its mode is what a plain open() gives under the process's umask."""
    old = os.umask(umask)
    try:
        written = weights_io.save_atomic({"w": torch.ones(2)}, tmp_path / "checkpoint.pt")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.umask(old) == old  # the umask is left as it was
