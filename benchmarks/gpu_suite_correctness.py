"""GPU suite, correctness: every backend against the float64 reference with poisoned outputs
(forward, argmax, the three gradients), ties (the lowest index), NaN at L = 192, Triton and CUDA
argmax agreement, and one case whose ``pair * L`` offset passes 2**31. Each check records its
errors and ``ok``; ``correctness_failures`` collects the failed ones for the exit code."""

from __future__ import annotations

import os
import time

from gpu_suite_common import (attempt, empty_cache, float32_precision, precisions, rel_err, sync)

TWO_31 = 2 ** 31
ALL_LABELS = ("fp32-ieee", "fp32-tf32", "fp16", "bf16")
# (shape (nq, ng, lq, lg, d), precision labels). Every precision at the real shape; at the odd
# shapes (masking: L not a multiple of the tiles, D % 16 != 0) exact fp32 and bf16, the one 16-bit
# type the interpreter tests cannot run (fp16 and TF32 masking are the same code path).
CORRECTNESS_CASES = (((3, 4, 37, 21, 40), ("fp32-ieee", "bf16")),
                     ((8, 8, 192, 192, 512), ALL_LABELS),
                     ((5, 3, 128, 96, 129), ("fp32-ieee", "bf16")))
TIES_SHAPES = ((3, 4, 37, 21, 40), (4, 4, 192, 192, 64))
NAN_SHAPE = (2, 3, 192, 192, 48)


def op_launches() -> list:
    """What the correctness sections launch through the op: (shape, label, gate, backward).
    The plan counts the Triton kernels to compile from it; the warm-up compiles them."""
    launches = [(shape, label, True, True) for shape, labels in CORRECTNESS_CASES for label in labels]
    launches += [(shape, label, gate, False) for shape in TIES_SHAPES for label in ALL_LABELS
                 for gate in (False, True)]
    launches += [(NAN_SHAPE, label, True, False) for label in ALL_LABELS]
    launches.append(((3400, 3400, 192, 192, 16), "bf16", False, False))  # the 2**31 case
    return launches


def _seeded():
    import torch

    seed = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; the JSON keeps it
    return seed, torch.Generator().manual_seed(seed)


def _poisoned(fn):
    """fn() with the op's outputs poisoned first (an unwritten element fails its check)."""
    from transmatcher_fast.ops import dispatch

    dispatch.poison_outputs(True)
    try:
        return fn()
    finally:
        dispatch.poison_outputs(False)


def correctness(backends, log, device="cuda", shapes=None, labels=None) -> dict:
    """``shapes`` with ``labels`` (tests) replace CORRECTNESS_CASES."""
    cases = CORRECTNESS_CASES if shapes is None else [(s, labels or ALL_LABELS) for s in shapes]
    return _poisoned(lambda: _correctness(backends, log, device, cases))


def _correctness(backends, log, device, cases) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    seed, gen = _seeded()
    checks, indices = [], {}
    for shape, labels in cases:
        nq, ng, lq, lg, d = shape
        base = [torch.randn(s, generator=gen, dtype=torch.float64)
                for s in ((nq, lq, d), (ng, lg, d), (lg, lq))]
        grad_q = torch.randn((nq, ng, lq), generator=gen)
        grad_g = torch.randn((nq, ng, lg), generator=gen)
        for label, dtype, tf32 in precisions(labels):
            q16, g16 = base[0].to(dtype), base[1].to(dtype)
            # The reference on the rounded inputs: what the tolerance is measured against.
            same_dtype = reference.max_sim(q16.double(), g16.double(), base[2])
            for backend in backends:
                record = {"backend": backend, "precision": label, "shape": shape}

                def run():
                    with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                        leaves = [q16.to(device).requires_grad_(), g16.to(device).requires_grad_(),
                                  base[2].float().to(device).requires_grad_()]
                        out = transmatcher_fast.max_sim(*leaves, return_indices=True)
                        ((out[0] * grad_q.to(device)).sum()
                         + (out[1] * grad_g.to(device)).sum()).backward()
                    return leaves, out
                result = attempt(record, log, f"{backend} {label} {shape}", run)
                checks.append(record)
                if result is None:
                    continue
                leaves, (q_best, g_best, q_index, g_index) = result
                routed = reference.max_sim_grads(
                    grad_q.double(), grad_g.double(), q16.double(), g16.double(), base[2],
                    q_index.cpu(), g_index.cpu())
                # Forward against the exact scores of the rounded inputs; gradients against the
                # float64 formula routed through the backend's own argmax. 16-bit inputs are
                # exact in float64 and accumulate in fp32: the forward is as tight as fp32;
                # their gradients round the routed weights to 16 bits.
                fwd_limit = {"fp32-tf32": 5e-3}.get(label, 1e-5 if label == "fp32-ieee" else 1e-4)
                grad_limit = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3}.get(label, 2e-2)
                errors = {"q_best": rel_err(q_best, same_dtype[0]),
                          "g_best": rel_err(g_best, same_dtype[1]),
                          "grad_query": rel_err(leaves[0].grad, routed[0]),
                          "grad_gallery": rel_err(leaves[1].grad, routed[1]),
                          "grad_score_embed": rel_err(leaves[2].grad, routed[2])}
                index_ok = indices_select_the_max(q16, g16, base[2], q_index.cpu(), g_index.cpu(),
                                                  fwd_limit)
                ok = (index_ok and all(errors[k] <= fwd_limit for k in ("q_best", "g_best"))
                      and all(errors[k] <= grad_limit for k in errors if k.startswith("grad")))
                record.update(errors=errors, indices_select_the_max=index_ok, ok=ok)
                log(f"{backend:7} {label:9} {shape}: {'ok' if ok else 'FAIL'} "
                    + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
                if label == "fp32-ieee":
                    indices[(backend, shape)] = (q_index.cpu(), g_index.cpu(),
                                                 [leaf.grad.cpu() for leaf in leaves])
    agreement = []
    if len(backends) == 2:
        for shape, _ in cases:
            if (backends[0], shape) not in indices or (backends[1], shape) not in indices:
                continue
            a, b = indices[(backends[0], shape)], indices[(backends[1], shape)]
            same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            grads = max(rel_err(x, y) for x, y in zip(a[2], b[2]))
            agreement.append({"shape": shape, "same_argmax": same, "grad_rel_diff": grads,
                              "ok": same and grads <= 1e-5})
            log(f"triton vs cuda {shape}: same argmax {same}, gradients {grads:.1e}")
    return {"checks": checks, "triton_vs_cuda": agreement, "seed": seed}


def ties(backends, log, device="cuda", shapes=None, labels=None) -> dict:
    """Integer-valued inputs in {-1, 0, 1}: many equal maxima, every score exact in every
    precision. The values must equal the float64 reference's exactly, the argmax must be the
    lowest index among the equal maxima (the reference's, torch.max on the CPU), and the
    backends must agree with each other."""
    return _poisoned(lambda: _ties(backends, log, device, shapes or TIES_SHAPES, labels))


def _ties(backends, log, device, shapes, labels) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    seed, gen = _seeded()
    checks, seen = [], {}
    for shape in shapes:
        nq, ng, lq, lg, d = shape
        q = torch.randint(-1, 2, (nq, lq, d), generator=gen).double()
        g = torch.randint(-1, 2, (ng, lg, d), generator=gen).double()
        # No gate, and a constant gate (sigmoid(0) = 0.5: still exact).
        for gate_name, embed in (("none", None), ("half", torch.zeros(lg, lq, dtype=torch.float64))):
            expected = reference.max_sim(q, g, embed, return_indices=True)
            tied = _tie_fraction(q, g, embed)
            for label, dtype, tf32 in precisions(labels):
                for backend in backends:
                    record = {"backend": backend, "precision": label, "shape": shape,
                              "gate": gate_name, "tied_fraction": tied}

                    def run():
                        with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                            out = transmatcher_fast.max_sim(
                                q.to(dtype).to(device), g.to(dtype).to(device),
                                None if embed is None else embed.float().to(device),
                                return_indices=True)
                        return [t.cpu() for t in out]
                    out = attempt(record, log, f"ties {backend} {label} {shape} gate={gate_name}", run)
                    checks.append(record)
                    if out is None:
                        continue
                    values_exact = bool(torch.equal(out[0].double(), expected[0])
                                        and torch.equal(out[1].double(), expected[1]))
                    lowest_index = bool(torch.equal(out[2], expected[2])
                                        and torch.equal(out[3], expected[3]))
                    record.update(values_exact=values_exact, lowest_index=lowest_index,
                                  ok=values_exact and lowest_index)
                    seen[(backend, label, shape, gate_name)] = out
                    log(f"ties {backend:7} {label:9} {shape} gate={gate_name} "
                        f"(tied {tied:.0%}): {'ok' if record['ok'] else 'FAIL'}")
    agreement = []
    if len(backends) == 2:
        for (backend, label, shape, gate_name), a in seen.items():
            if backend != backends[0] or (backends[1], label, shape, gate_name) not in seen:
                continue
            b = seen[(backends[1], label, shape, gate_name)]
            same = bool(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]))
            agreement.append({"precision": label, "shape": shape, "gate": gate_name,
                              "same_argmax": same, "ok": same})
    return {"checks": checks, "triton_vs_cuda": agreement, "seed": seed}


def _tie_fraction(q, g, embed) -> float:
    import torch

    scores = torch.einsum("itd,jsd->ijst", q, g)
    if embed is not None:
        scores = scores * torch.sigmoid(embed)
    best = scores.amax(dim=2, keepdim=True)
    return ((scores == best).sum(dim=2) > 1).double().mean().item()


def nan_check(backends, log, device="cuda", shape=NAN_SHAPE, labels=None) -> dict:
    """One NaN query location and one NaN gallery location at L = 192 (past the first tiles):
    the outputs they reach are NaN, with the index the reference (torch.max on the CPU) gives,
    and every other output matches the reference."""
    return _poisoned(lambda: _nan_check(backends, log, device, shape, labels))


def _nan_check(backends, log, device, shape, labels) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    nq, ng, lq, lg, d = shape
    seed, gen = _seeded()
    q = torch.randn(nq, lq, d, generator=gen, dtype=torch.float64)
    g = torch.randn(ng, lg, d, generator=gen, dtype=torch.float64)
    e = torch.randn(lg, lq, generator=gen, dtype=torch.float64)
    t0, s0 = min(150, lq - 1), min(100, lg - 1)
    q[0, t0, d // 2] = float("nan")
    g[ng - 1, s0, 1] = float("nan")
    checks = []
    for label, dtype, tf32 in precisions(labels):
        qd, gd = q.to(dtype), g.to(dtype)
        expected = reference.max_sim(qd.double(), gd.double(), e, return_indices=True)
        for backend in backends:
            record = {"backend": backend, "precision": label, "shape": shape,
                      "nan_query_location": [0, t0], "nan_gallery_location": [ng - 1, s0]}

            def run():
                with transmatcher_fast.use_backend(backend), float32_precision(tf32):
                    out = transmatcher_fast.max_sim(qd.to(device), gd.to(device),
                                                    e.float().to(device), return_indices=True)
                return [t.cpu() for t in out]
            out = attempt(record, log, f"nan {backend} {label}", run)
            checks.append(record)
            if out is None:
                continue
            limit = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3}.get(label, 1e-4)
            parts = {}
            for k, name in ((0, "q"), (1, "g")):
                want_nan = torch.isnan(expected[k])
                finite = ~want_nan
                parts[name] = {
                    "nan_where_reference_nan": bool(torch.equal(torch.isnan(out[k]), want_nan)),
                    "index_at_nan_equal": bool(torch.equal(out[k + 2][want_nan],
                                                           expected[k + 2][want_nan])),
                    "reached": int(want_nan.sum()),
                    "finite_rel_err": rel_err(out[k][finite], expected[k][finite]) if finite.any() else 0.0,
                }
            ok = all(p["nan_where_reference_nan"] and p["index_at_nan_equal"]
                     and p["finite_rel_err"] <= limit and p["reached"] > 0 for p in parts.values())
            record.update(parts, ok=ok)
            log(f"nan {backend:7} {label:9} {shape}: {'ok' if ok else 'FAIL'} "
                + " ".join(f"{n}:nan={p['nan_where_reference_nan']},idx={p['index_at_nan_equal']},"
                           f"err={p['finite_rel_err']:.1e}" for n, p in parts.items()))
    return {"checks": checks, "seed": seed}


def offset_plan(nq=3400, ng=3400, length=192, d=16, rows=4, free_bytes=None,
                output_rate=2e11, dtype="bfloat16") -> dict:
    """The shape arithmetic of the 2**31 case: output elements, the largest flat offset, the
    bytes the outputs take (q_best, g_best fp32 and their int32 indices), whether the checked
    rows all lie past 2**31, whether it fits in ``free_bytes``, and a time estimate per backend
    (``output_rate``: output bytes written and poisoned per second, a conservative lead)."""
    elements = nq * ng * length
    output_bytes = 2 * elements * (4 + 4)
    reference_bytes = rows * ng * length * length * 8
    first_checked_offset = (nq - rows) * ng * length
    plan = {"nq": nq, "ng": ng, "l": length, "d": d, "rows": rows, "dtype": dtype,
            "elements_per_output": elements, "largest_offset": elements - 1,
            "passes_2_31": elements - 1 >= TWO_31,
            "checked_rows_past_2_31": first_checked_offset >= TWO_31,
            "output_bytes": output_bytes, "reference_bytes": reference_bytes,
            "estimate_s_per_backend": round(3 + 3 * output_bytes / output_rate, 1)}
    if free_bytes is not None:
        plan["free_bytes"] = free_bytes
        plan["fits"] = output_bytes * 1.15 + reference_bytes * 2 < free_bytes
    return plan


def offset_case(backends, log, device="cuda", plan=None, remaining=None) -> dict:
    """Nq = Ng = 3400, L = 192, D = 16, bf16, no gate: Nq*Ng*L passes 2**31, so a kernel that
    computes the flat output offset in 32 bits writes the last rows wrongly (or out of bounds).
    The last query images' rows are compared with the float64 reference on the GPU."""
    import torch

    free, _ = torch.cuda.mem_get_info() if device == "cuda" else (None, None)
    plan = plan or offset_plan(free_bytes=free)
    if not plan["passes_2_31"] or not plan["checked_rows_past_2_31"]:
        raise ValueError(f"offset case does not pass 2**31: {plan}")
    if plan.get("fits") is False:
        return {"plan": plan, "checks": [], "skipped": "not enough free device memory"}
    return _poisoned(lambda: _offset_case(backends, log, device, plan, remaining))


def _offset_case(backends, log, device, plan, remaining) -> dict:
    import torch

    import transmatcher_fast
    from transmatcher_fast import reference

    result = {"plan": plan, "checks": []}
    nq, ng, length, d, rows = plan["nq"], plan["ng"], plan["l"], plan["d"], plan["rows"]
    dtype = getattr(torch, plan.get("dtype", "bfloat16"))
    q = torch.randn(nq, length, d, device=device, dtype=dtype)
    g = torch.randn(ng, length, d, device=device, dtype=dtype)
    expected = reference.max_sim(q[-rows:].double(), g.double(), None, return_indices=True)
    scores = torch.einsum("itd,jsd->ijst", q[-rows:].double(), g.double())
    argmaxes = {}
    for backend in backends:
        if remaining is not None and remaining() < plan["estimate_s_per_backend"] + 5:
            result["checks"].append({"backend": backend, "ok": None, "skipped": "deadline"})
            continue
        record = {"backend": backend}
        start = time.time()

        def run():
            with transmatcher_fast.use_backend(backend):
                out = transmatcher_fast.max_sim(q, g, None, return_indices=True)
            sync()
            tail = [t[-rows:].clone() for t in out]
            written = bool((out[2] >= 0).all().item() and (out[3] >= 0).all().item()
                           and not torch.isnan(out[0]).any().item()
                           and not torch.isnan(out[1]).any().item())
            del out
            empty_cache()
            return tail, written
        got = attempt(record, log, f"offset 2**31 {backend}", run)
        result["checks"].append(record)
        if got is None:
            continue
        tail, written = got
        tol = 1e-4 * scores.abs().max().item()
        at_q = scores.gather(2, tail[2].long().unsqueeze(2)).squeeze(2)
        at_g = scores.gather(3, tail[3].long().unsqueeze(3)).squeeze(3)
        record.update(
            all_written=written,
            q_best_rel_err=rel_err(tail[0], expected[0]),
            g_best_rel_err=rel_err(tail[1], expected[1]),
            indices_select_the_max=bool((at_q >= expected[0] - tol).all().item()
                                        and (at_g >= expected[1] - tol).all().item()),
            seconds=round(time.time() - start, 1))
        record["ok"] = (written and record["indices_select_the_max"]
                        and record["q_best_rel_err"] <= 1e-4 and record["g_best_rel_err"] <= 1e-4)
        argmaxes[backend] = (tail[2], tail[3])
        log(f"offset 2**31 {backend}: {'ok' if record['ok'] else 'FAIL'} {record}")
    if len(argmaxes) == 2:
        a, b = argmaxes.values()
        result["triton_vs_cuda_same_argmax"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    return result


def indices_select_the_max(query, gallery, embed, q_index, g_index, rtol) -> bool:
    import torch

    scores = torch.einsum("itd,jsd->ijst", query.double(), gallery.double()) * torch.sigmoid(embed)
    tol = rtol * scores.abs().max().item()
    at_q = scores.gather(2, q_index.long().unsqueeze(2)).squeeze(2)
    at_g = scores.gather(3, g_index.long().unsqueeze(3)).squeeze(3)
    return bool((at_q >= scores.amax(2) - tol).all() and (at_g >= scores.amax(3) - tol).all())


def correctness_failures(results: dict) -> list:
    """Every failed correctness check in the results (the exit code's reason)."""
    failures = []
    for name in ("correctness", "ties", "nan", "offset_2_31"):
        section = results.get(name)
        if not isinstance(section, dict):
            continue
        if "error" in section:
            failures.append({"section": name, "error": section["error"][-500:]})
        for key in ("checks", "triton_vs_cuda"):
            for check in section.get(key, []):
                if check.get("ok") is False:
                    failures.append({"section": name, **{k: v for k, v in check.items()
                                                         if k != "errors"}})
        if section.get("triton_vs_cuda_same_argmax") is False:
            failures.append({"section": name, "triton_vs_cuda_same_argmax": False})
    pytest_result = results.get("pytest")
    if isinstance(pytest_result, dict) and pytest_result.get("returncode") == 1:
        failures.append({"section": "pytest", "summary": pytest_result.get("summary")})
    return failures
