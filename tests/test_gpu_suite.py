"""benchmarks/gpu_suite.py and benchmarks/gpu_run.sh without a GPU: the sections that can run on
the Triton interpreter, the deadline and the saving after every section."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_gpu_suite_correctness_checks_run_on_the_triton_interpreter():
    """The suite's correctness section, on CPU tensors through the interpreter (bf16 is broken
    there): its checks pass for the Triton kernels and record every error measure."""
    import torch

    from transmatcher_fast.ops import dispatch

    if "triton" not in dispatch.available_backends("cpu") or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter on CPU")
    import gpu_suite  # benchmarks/ is on sys.path (above)

    report = gpu_suite.correctness(["triton"], lambda text: None, device="cpu",
                                   shapes=[(2, 3, 9, 7, 20)], labels=["fp32-ieee", "fp16"])
    assert len(report["checks"]) == 2
    for check in report["checks"]:
        assert check["ok"], check
        assert set(check["errors"]) == {"q_best", "g_best", "grad_query", "grad_gallery",
                                        "grad_score_embed"}
