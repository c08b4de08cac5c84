"""The committed launch table (ops/tuning.py): read and validated, its classes, and dispatch and
the Triton launch following what it names."""

import dataclasses
import json

import pytest
import torch

import transmatcher_fast
from transmatcher_fast import max_sim
from transmatcher_fast.ops import dispatch, tuning


def test_the_committed_table_loads_and_validates():
    table = tuning.load(str(tuning.TABLE_PATH))
    assert table["format"] == tuning.FORMAT and isinstance(table["classes"], dict)


def test_shape_classes():
    assert tuning.shape_class(64 * 64, torch.float16, False) == "small-fp16"
    assert tuning.shape_class(256 * 4096, torch.bfloat16, False) == "large-bf16"
    assert tuning.shape_class(tuning.LARGE_PAIRS, torch.float32, True) == "large-fp32-tf32"
    assert tuning.shape_class(1, torch.float32, False) == "small-fp32-ieee"


@pytest.mark.parametrize("table, message", [
    ({"format": 2, "classes": {}}, "not a launch table"),
    ({"format": 1}, "'classes' must be an object"),
    ({"format": 1, "classes": {"small-fp16": {"backend": "tpu"}}}, "backend must be"),
])
def test_a_bad_table_names_the_file_and_the_problem(tmp_path, table, message):
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message) as error:
        tuning.load.__wrapped__(str(path))
    assert str(path) in str(error.value)


def test_dispatch_prefers_the_backend_the_table_measured_faster(monkeypatch):
    """On CUDA the preference is triton, then cuda; a table entry for the call's class puts its
    backend first (when available), and other classes keep the preference."""
    for name in ("triton", "cuda"):
        backend = dataclasses.replace(dispatch.by_name(name), is_available=lambda: True,
                                      device_types=frozenset({"cuda"}))
        monkeypatch.setitem(dispatch._registry, name, backend)
    cuda = torch.device("cuda")
    table = {"format": 1, "classes": {"large-bf16": {"backend": "cuda"}}}
    with tuning.use_table(table):
        assert dispatch.select(cuda, torch.bfloat16, 256 * 4096).name == "cuda"
        assert dispatch.select(cuda, torch.bfloat16, 64 * 64).name == "triton"
        assert dispatch.select(cuda, torch.float16, 256 * 4096).name == "triton"
        with transmatcher_fast.use_backend("triton"):  # a user's choice beats the table
            assert dispatch.select(cuda, torch.bfloat16, 256 * 4096).name == "triton"


def test_a_table_measured_on_another_gpu_model_is_not_applied(monkeypatch):
    monkeypatch.setattr(tuning, "_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    entry = {"backend": "cuda"}
    for device, expected in (("NVIDIA H200", {}), ("NVIDIA A100-SXM4-80GB", entry), (None, entry)):
        table = {"format": 1, "device": device, "classes": {"large-bf16": entry}}
        with tuning.use_table(table):
            assert tuning.entry(10**6, torch.bfloat16, False, torch.device("cuda", 0)) == expected
            assert tuning.entry(10**6, torch.bfloat16, False) == entry  # no device: no check


def test_the_triton_launch_uses_the_tables_configuration(monkeypatch):
    if "triton" not in dispatch.available_backends("cpu"):
        pytest.skip("needs the Triton interpreter on CPU")
    from transmatcher_fast.kernels import max_sim as kernels

    seen = []
    real = kernels.forward
    monkeypatch.setattr(kernels, "forward",
                        lambda *args, **kw: seen.append(args[4]) or real(*args, **kw))
    query, gallery = torch.randn(2, 40, 16), torch.randn(3, 36, 16)
    measured = {"variant": "strip", "block_s": 16, "block_t": 32, "group_q": 2}
    table = {"format": 1, "classes": {"small-fp32-ieee": {"triton": measured}}}
    with tuning.use_table(table), transmatcher_fast.use_backend("triton"):
        ours = max_sim(query, gallery)
        assert seen[-1] == kernels.ForwardConfig(block_s=16, block_t=32, block_k=16, group_q=2,
                                                 variant="strip")
    with transmatcher_fast.use_backend("triton"):
        max_sim(query, gallery)
    assert seen[-1] == kernels.forward_config(40, 36, 16, torch.float32)  # no entry: default
    expected = transmatcher_fast.reference.max_sim(query.double(), gallery.double())
    assert torch.allclose(ours[0].double(), expected[0], rtol=1e-5, atol=1e-5)


def test_a_table_entry_with_an_unknown_field_is_refused():
    from transmatcher_fast.kernels import max_sim as kernels

    with pytest.raises(ValueError, match="unknown"):
        kernels.forward_config(192, 192, 512, torch.float16, {"block_m": 64})
    with pytest.raises(ValueError, match="variant"):
        kernels.forward_config(192, 192, 512, torch.float16, {"variant": "persistent"})


def test_a_table_entry_can_name_the_pairs_forward():
    """The persistent "pairs" forward is a variant the table may choose once a GPU run measured
    it faster; its gallery-group size is a field like the others, and a shape it cannot hold
    (more than 4 gallery blocks) falls back to the tiled kernel."""
    from transmatcher_fast.kernels import max_sim as kernels

    config = kernels.forward_config(192, 192, 512, torch.float16,
                                    {"variant": "pairs", "num_warps": 8, "group_g": 64})
    assert (config.variant, config.group_g, config.num_warps) == ("pairs", 64, 8)
    assert config.name == "pairs-64x64x64-G64-w8-s3"
    too_long = kernels.forward_config(192, 320, 512, torch.float16, {"variant": "pairs"})
    assert too_long.variant == "tiled"
    # Until a GPU run decides, the built-in default stays the tiled kernel.
    assert kernels.forward_config(192, 192, 512, torch.float16).variant == "tiled"
