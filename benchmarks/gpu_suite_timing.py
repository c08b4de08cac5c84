"""GPU suite, timings: the ceilings (bf16 and TF32 8192^3 cuBLAS GEMMs, a device copy), the
same-shape baselines, and the training and evaluation timings against them.

Baselines, measured in the same run as what they are compared with:
- ``gemm``: cuBLAS on the same shape ``[Nq*Lq, D] x [D, Ng*Lg]`` in the dtype the op runs in
  (bf16 / fp16, or float32 with TF32 for fp32 evaluation): it writes all Nq*Ng*L^2 scores;
- ``gemm_no_scores``: the same-shape product as a Triton GEMM that reduces each tile on the fly and
  stores one number per program: the MMA work at K = D without the score traffic;
- ``ceilings``: the 8192^3 rates, the large-K limit of the tensor cores.
``fraction_of_gemm`` and ``fraction_of_gemm_no_scores`` are rate ratios (this method's required
FLOPs per second over the baseline's). Training counts the work actually required: the forward
GEMM FLOPs plus the gather backward (gpu_suite_common.backward_flops), not three GEMMs.
"""

from __future__ import annotations

import gpu_suite_common as common
from gpu_suite_common import empty_cache, float32_precision, flops, backward_flops, sync


def time_ms(fn, rotations: int, warmup: int = 100, rep: int = 500) -> float:
    """Median milliseconds of fn(k) for k cycling through the rotating input copies. A call of
    over 100 ms is timed three times with events instead of do_bench's many runs."""
    import torch
    from triton.testing import do_bench

    state = {"k": 0}

    def call():
        state["k"] = (state["k"] + 1) % rotations
        fn(state["k"])

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()  # warm-up (compilation, handles)
    start.record()
    call()
    end.record()
    sync()
    first = start.elapsed_time(end)
    if first > 100:
        times = [first]
        for _ in range(2):
            start.record()
            call()
            end.record()
            sync()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    return do_bench(call, warmup=warmup, rep=rep, return_mode="median")


def peak_bytes(fn) -> int:
    import torch

    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(0)
    sync()
    return torch.cuda.max_memory_allocated() - base


def inputs(shape, dtype, copies, requires_grad=False):
    import torch

    nq, ng, lq, lg, d = shape
    out = []
    for _ in range(copies):
        q = torch.randn(nq, lq, d, device=common.DEVICE, dtype=dtype)
        g = torch.randn(ng, lg, d, device=common.DEVICE, dtype=dtype)
        e = torch.randn(lg, lq, device=common.DEVICE)
        out.append([t.requires_grad_(requires_grad) for t in (q, g, e)])
    return out


def copies_beyond_l2(shape, dtype) -> int:
    import torch

    nq, ng, lq, lg, d = shape
    size = (nq * lq + ng * lg) * d * torch.tensor([], dtype=dtype).element_size()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(16, -(-3 * l2 // size)))


def report_rows(work: float, times: dict, peaks: dict, errors: dict | None = None,
                baselines: dict | None = None) -> dict:
    """Per method: ms, TFLOP/s (``work`` FLOPs), peak memory, and against the baselines
    (``baselines``: method -> its own FLOPs, default ``work``) the rate ratio
    ``fraction_of_<baseline>``, the speed-up over the reference and its memory reduction."""
    baselines = baselines if baselines is not None else {"gemm": work}
    rows = {}
    for method, ms in times.items():
        own = baselines.get(method, work)
        rows[method] = {"ms": ms, "tflops": own / ms / 1e9, "peak_extra_bytes": peaks.get(method)}
    for method, row in rows.items():
        for base in baselines:
            if base in rows and method not in baselines:
                key = "fraction_of_gemm" if base == "gemm" else f"fraction_of_{base}"
                row[key] = row["tflops"] / rows[base]["tflops"]
        if "reference" in rows:
            row["speedup_vs_reference"] = rows["reference"]["ms"] / row["ms"]
            if peaks.get("reference") and peaks.get(method):
                row["memory_reduction_vs_reference"] = peaks["reference"] / peaks[method]
    for method, error in (errors or {}).items():
        rows[method] = {"error": error}
    return rows


def measure(methods: dict, copies: int, log, name: str, work: float, remaining=None,
            baselines: dict | None = None) -> dict:
    """Peak memory and time of each method; near the deadline the rest are skipped (a
    torch.compile method, whose first call compiles, needs a minute)."""
    times, peaks, errors = {}, {}, {}
    for method, fn in methods.items():
        left = remaining() if remaining is not None else float("inf")
        if left < (60 if method.startswith("compiled") else 10):
            errors[method] = f"skipped: {left:.0f} s left before the deadline"
            log(f"{name} {method}: {errors[method]}")
            continue
        record = {}

        def run():
            peaks[method] = None if method.startswith("gemm") else peak_bytes(fn)
            times[method] = time_ms(fn, copies)
        common.attempt(record, log, f"{name} {method}", run)
        if "error" in record:
            errors[method] = record["error"]
    rows = report_rows(work, times, peaks, errors, baselines)
    for method, row in rows.items():
        if "ms" in row:
            log(f"{name} {method:22} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
                + " ".join(f"{k}={v:.2f}" for k, v in row.items()
                           if isinstance(v, float) and k not in ("ms", "tflops")))
    return rows


def ceilings(log) -> dict:
    """The two numbers METHOD.md asks for, measured here: the 8192^3 GEMM rate on random data
    (bf16, and float32 with TF32: the limit of fp32 evaluation) and the device-to-device copy
    bandwidth (bytes read + written)."""
    import torch
    from triton.testing import do_bench

    n = 8192
    result = {}
    for label, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a = torch.randn(n, n, device=common.DEVICE, dtype=dtype)
        b = torch.randn(n, n, device=common.DEVICE, dtype=dtype)
        with float32_precision(True):
            ms = do_bench(lambda: a @ b, warmup=100, rep=400, return_mode="median")
        result[f"gemm_{label}_8192_tflops"] = 2 * n ** 3 / ms / 1e9
        result[f"gemm_{label}_8192_ms"] = ms
        del a, b
    src = torch.randn(1 << 30, device=common.DEVICE, dtype=torch.float32)  # 4 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    result.update(copy_tb_per_s=2 * src.numel() * 4 / copy_ms / 1e9, copy_bytes=2 * src.numel() * 4)
    del src, dst
    empty_cache()
    log(f"ceilings: bf16 GEMM {result['gemm_bf16_8192_tflops']:.0f} TFLOP/s, TF32 GEMM "
        f"{result['gemm_tf32_8192_tflops']:.0f} TFLOP/s, copy {result['copy_tb_per_s']:.2f} TB/s")
    return result


# --------------------------------------------------------------------------------------------
# Same-shape baselines


def _tile_sums_kernel():
    """A GEMM ``A [M, K] x B[N, K]^T`` whose programs each store only the sum of their tile:
    the product's MMA work and operand traffic without the M*N output. Built on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        # Bands of GROUP_M row blocks sweep the columns: a band of A stays in L2 while B is
        # read about M / (GROUP_M * BLOCK_M) times from DRAM (once per band).
        pid = tl.program_id(0)
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        band = pid // (GROUP_M * blocks_n)
        band_rows = tl.minimum(blocks_m - band * GROUP_M, GROUP_M)
        within = pid % (GROUP_M * blocks_n)
        rows = (band * GROUP_M + within % band_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (within // band_rows) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_in = (k0 + ks) < K
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * K + (k0 + ks)[None, :],
                        mask=(rows[:, None] < M) & k_in[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :].to(tl.int64) * K + (k0 + ks)[:, None],
                        mask=(cols[None, :] < N) & k_in[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    return kernel


_KERNEL = []


def gemm_tile_sums(a, b, out=None, block=(128, 128, 64), num_warps=8, num_stages=3, tf32=True,
                   group_m=64):
    """Per program, the sum of its ``block[0] x block[1]`` tile of ``a @ b.T`` (float32)."""
    import torch
    import triton

    if not _KERNEL:
        _KERNEL.append(_tile_sums_kernel())
    (m, k), n = a.shape, b.shape[0]
    block_k = block[2] if a.element_size() <= 2 else block[2] // 2
    programs = triton.cdiv(m, block[0]) * triton.cdiv(n, block[1])
    out = torch.empty(programs, device=a.device, dtype=torch.float32) if out is None else out
    precision = "tf32" if (tf32 or a.dtype != torch.float32) else "ieee"
    _KERNEL[0][(programs,)](a, b, out, m, n, k, BLOCK_M=block[0], BLOCK_N=block[1],
                            BLOCK_K=block_k, GROUP_M=group_m, INPUT_PRECISION=precision,
                            num_warps=num_warps, num_stages=num_stages)
    return out


def baseline_methods(shape, dtype, chunk: int | None = None) -> dict:
    """``gemm`` (cuBLAS, writes every score, in gallery chunks of ``chunk`` images whose output
    is at most 2 GiB) and ``gemm_no_scores`` on the shape of the op's forward, in ``dtype``
    (float32 runs with TF32 on, the precision ours is timed in)."""
    import torch

    nq, ng, lq, lg, d = shape
    a = torch.randn(nq * lq, d, device=common.DEVICE, dtype=dtype)
    b = torch.randn(ng * lg, d, device=common.DEVICE, dtype=dtype)
    chunk = chunk or ng
    while ng % chunk or (chunk > 1 and chunk * nq * lq * lg * a.element_size() > (2 << 30)):
        chunk -= 1  # a divisor of Ng: every chunk fills the output buffer
    out = torch.empty(nq * lq, chunk * lg, device=common.DEVICE, dtype=dtype)

    def gemm(_k):
        with float32_precision(True):
            for j0 in range(0, ng * lg, chunk * lg):
                torch.mm(a, b[j0:j0 + chunk * lg].T, out=out)
    sums = gemm_tile_sums(a, b)  # compiles outside the timing
    return {"gemm": gemm, "gemm_no_scores": lambda _k: gemm_tile_sums(a, b, sums)}


# --------------------------------------------------------------------------------------------
# Training and evaluation


def bench_training(backends, log, table=None, compile_reference=True,
                   shape=(64, 64, 192, 192, 512), remaining=None) -> dict:
    """64x64 pairs, forward + backward under fp16 autocast (upstream's AMP training)."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    copies = copies_beyond_l2(shape, torch.float32)
    data = inputs(shape, torch.float32, copies, requires_grad=True)

    def step(op):
        def run(k):
            q, g, e = data[k]
            with torch.autocast(torch.device(common.DEVICE).type, dtype=torch.float16):
                q_best, g_best = op(q, g, e)[:2]
            (q_best.float().sum() + g_best.float().sum()).backward()
        return run

    methods = {}
    for backend in backends:
        def ours(q, g, e, backend=backend):
            with transmatcher_fast.use_backend(backend):
                return transmatcher_fast.max_sim(q, g, e)
        methods[backend] = step(ours)
    if table is not None:
        from transmatcher_fast.ops import tuning

        def tuned(q, g, e):
            with tuning.use_table(table), transmatcher_fast.use_backend(None):
                return transmatcher_fast.max_sim(q, g, e)
        methods["tuned_auto"] = step(tuned)
    methods["reference"] = step(reference.max_sim)
    if compile_reference:
        methods["compiled_reference"] = step(torch.compile(reference.max_sim))
    methods.update(baseline_methods(shape, torch.float16))
    forward = flops(*shape)
    required = forward + backward_flops(*shape)
    rows = measure(methods, copies, log, "training fwd+bwd fp16", required, remaining,
                   baselines={"gemm": forward, "gemm_no_scores": forward})
    return {"shape": dict(zip(("nq", "ng", "lq", "lg", "d"), shape)), "flops": required,
            "forward_flops": forward, "methods": rows, "compiled_reference": compile_reference,
            "note": "flops = 2*Nq*Ng*Lq*Lg*D (forward) + 4*Nq*Ng*(Lq+Lg)*D (the gather backward "
                    "from the saved argmax): the work required; baselines are fp16 GEMMs of the "
                    "forward's shape, compared by rate"}


def bench_evaluation(backends, log, table=None, compile_reference=True, remaining=None,
                     shape=(256, 4096, 192, 192, 512), chunk=128,
                     dtypes=(("bf16", "bfloat16"), ("fp32-tf32", "float32")), progress=None) -> dict:
    """256x4096 pairs, forward only, bf16 and fp32 (ours with TF32 allowed; the reference with
    TF32 off, upstream's setting, and with it on). The baselines run in the evaluated dtype: a
    bf16 GEMM for bf16, a TF32 GEMM for fp32. ``chunk``: gallery images per reference chunk
    (256*128*192*192 scores: 2.4 GB in bf16); a divisor of Ng. torch.compile(reference) runs
    for bf16 only (one compilation fits the plan)."""
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    nq, ng, lq, lg, d = shape
    reports = {}
    compiled_chunk = torch.compile(reference.max_sim) if compile_reference else None

    def chunked(fn):
        def run(q, g, e):
            for j0 in range(0, ng, chunk):
                fn(q, g[j0:j0 + chunk], e)
        return run

    for label, dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        if remaining is not None and remaining() < 25:
            reports[label] = {"skipped": "deadline"}
            continue
        copies = 2  # each copy is 0.85 GB (bf16): far beyond L2
        data = inputs(shape, dtype, copies)
        methods = {}
        with torch.no_grad():
            for backend in backends:
                def ours(k, backend=backend):
                    with transmatcher_fast.use_backend(backend), float32_precision(True):
                        transmatcher_fast.max_sim(*data[k])
                methods[backend] = ours
            if table is not None:
                from transmatcher_fast.ops import tuning

                def tuned(k):
                    with tuning.use_table(table), transmatcher_fast.use_backend(None), \
                            float32_precision(True):
                        transmatcher_fast.max_sim(*data[k])
                methods["tuned_auto"] = tuned
            for tf32 in ([False, True] if dtype == torch.float32 else [False]):
                def ref(k, tf32=tf32):
                    with float32_precision(tf32):
                        chunked(reference.max_sim)(*data[k])
                methods["reference" + ("_tf32" if tf32 else "")] = ref
            if compiled_chunk is not None and dtype != torch.float32:
                methods["compiled_reference"] = lambda k: chunked(compiled_chunk)(*data[k])
            methods.update(baseline_methods(shape, dtype, chunk))
            rows = measure(methods, copies, log, f"evaluation fwd {label}", flops(*shape), remaining,
                           baselines={"gemm": flops(*shape), "gemm_no_scores": flops(*shape)})
        reports[label] = {"shape": dict(zip(("nq", "ng", "lq", "lg", "d"), shape)),
                          "flops": flops(*shape), "methods": rows,
                          "baseline_dtype": "bfloat16" if dtype != torch.float32 else "float32 (TF32)",
                          "note": "gemm = cuBLAS [Nq*Lq, D] x [D, 128*Lg] chunks in the evaluated "
                                  "dtype (TF32 for fp32); gemm_no_scores = the same product "
                                  "reduced per tile; reference = upstream's materialised "
                                  "computation in 128-image gallery chunks"}
        del data, methods
        empty_cache()
        if progress is not None:
            progress(reports)
    return reports
