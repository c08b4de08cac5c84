import os

# Kernels receive NaN / -1 filled outputs, so an element a kernel does not write fails a test.
os.environ["TRANSMATCHER_FAST_POISON"] = "1"
# Without a GPU the Triton kernels run on CPU tensors in the interpreter; it must be on before
# transmatcher_fast registers the backends and before the kernels are defined.
if os.environ.get("TRITON_INTERPRET") is None and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import transmatcher_fast  # noqa: E402
from transmatcher_fast.ops import dispatch  # noqa: E402

# The `rng` fixture and the seed sweep (make test-seeds).
pytest_plugins = ["seed_sweep"]

# Backends that run on CPU tensors. "cpu" is the C++ kernel; its absence fails test_extension.
CPU_BACKENDS = ["cpu", "reference"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param not in dispatch.available_backends("cpu"):
        pytest.skip(f"backend {request.param} unavailable (see test_extension)")
    with transmatcher_fast.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    transmatcher_fast.set_backend(None)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small synthetic person set in Market-1501 layout (16 ids, 2 cameras, 64x32) that the
    training tests of every method read (and never write)."""
    from transmatcher_fast.data import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, ids=16, cams=2, images_per_cam=4, seed=3, height=64, width=32)
    return root


@pytest.fixture(scope="session")
def market_root(tmp_path_factory):
    """A ``--data-dir`` holding a tiny synthetic ``market1501`` (8 ids, 2 cameras, 3 images per
    camera, 64x32) that the command-line tests read (and never write)."""
    from transmatcher_fast.data import generate_synthetic

    root = tmp_path_factory.mktemp("market") / "data"
    generate_synthetic(root / "market1501", ids=8, cams=2, images_per_cam=3, seed=1, height=64, width=32)
    return root
