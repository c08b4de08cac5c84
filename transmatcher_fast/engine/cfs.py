"""Conditional filtering (CFS) of TransReID-SSL: rank unlabelled images by how close they are to
the re-ID domain, to pre-train on the closest part (README, "TransReID-SSL: DINO pre-training,
CFS, fine-tuning").

Two models map a ``[B, 3, 256, 128]`` batch to ``[B, D]`` features (the cls token after the final
LayerNorm; the caller builds and loads them): the *source proxy* (DINO briefly pre-trained on the
full unlabelled set, upstream's θ_pre) and the *target proxy* (a copy of it fine-tuned on re-ID
data, θ_ft). An image's score is the cosine of its two features: high means fine-tuning barely
changed its representation, i.e. the image is close to the re-ID data. The images are sorted by
descending score and the first K (50 % or 60 % upstream) are kept.

Files in ``out_dir`` (:func:`run_cfs`):

* ``cfs_list.txt``: the readable images, best first, one path per line, as given (upstream's
  ``CFS_list.pkl`` holds the same list, pickled). :func:`read_cfs_list` reads either.
* ``cfs_scores.txt``: line *i* is the score of line *i* of ``cfs_list.txt`` (``%.7f``).
* ``cfs_scores.npy``: float32 ``[N]`` scores in the *input* order, NaN for unreadable images.
* ``cfs_failed.txt``: ``path<TAB>error`` of each image that could not be scored (only if any).
* ``cfs_hist.png``: histogram of the scores, with the 50 % / 60 % cut-offs marked.

Scoring streams: one batch of images and features at a time, the scores (4 bytes per image) in
memory. It resumes: every ``save_every`` batches, and when interrupted (an exception, Ctrl-C), the
scores so far go to ``cfs_scores.partial.npy`` and the count to ``cfs_progress.json`` (each written
to a temporary file and renamed over the old one), and a new call with the same paths and
``out_dir`` continues where the last one stopped. A killed process loses at most ``save_every``
batches. The progress file records a hash of the path list: another list is refused. It cannot
see a change of model or transform: use a new ``out_dir`` for those.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.transforms import Compose, Normalize, Resize, ToTensor
from ..data.cfs_list import _count_for_ratio, read_cfs_list, select_top  # noqa: F401  (the API)
from ..weights_io import atomic_write
from .features import autocast, checked_loader, parse_dtype

PathLike = Union[str, os.PathLike]

LIST_FILE = "cfs_list.txt"
SCORES_FILE = "cfs_scores.txt"
SCORES_NPY = "cfs_scores.npy"
FAILED_FILE = "cfs_failed.txt"
HIST_FILE = "cfs_hist.png"
PARTIAL_FILE = "cfs_scores.partial.npy"
PROGRESS_FILE = "cfs_progress.json"
_FORMAT = "transmatcher_fast.cfs/1"
_SHOWN = 5  # failed paths named in the warning

__all__ = ["build_cfs_transform", "cfs_similarity", "compute_cfs_scores", "write_cfs_outputs",
           "run_cfs", "read_cfs_list", "select_top", "CFSResult"]


def build_cfs_transform(height: int = 256, width: int = 128, mean: Sequence[float] = (0.5, 0.5, 0.5),
                        std: Sequence[float] = (0.5, 0.5, 0.5)) -> Compose:
    """TransReID's test transform: resize to ``height x width`` (bicubic), to a float tensor in
    [0, 1], normalise. PIL image -> ``[3, height, width]``. The default mean/std 0.5 are
    TransReID-SSL's fine-tuning configs' (the scoring ran in its code base); DINO pre-trained with
    ImageNet's (``data.transforms.IMAGENET_MEAN`` / ``IMAGENET_STD``)."""
    return Compose([Resize(height, width), ToTensor(), Normalize(mean, std)])


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def cfs_similarity(source_model: nn.Module, target_model: nn.Module, images: Tensor,
                   amp: Union[str, torch.dtype, None] = None) -> Tensor:
    """The CFS of each image: ``cos(source(x), target(x))``. ``images`` [B, 3, H, W] ->
    float32 [B] on the CPU. Each model runs on the device of its parameters, as it is (the caller
    sets eval mode); ``amp``: an autocast dtype for the forwards (the cosine is float32)."""
    amp = parse_dtype(amp, "amp")
    features = []
    for name, model in (("source_model", source_model), ("target_model", target_model)):
        device = _device_of(model)
        with autocast(device, amp):
            out = model(images.to(device, non_blocking=True))
        if out.dim() != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"cfs: {name} must map [B, 3, H, W] to [B, D] features, got "
                             f"{tuple(out.shape)} for a batch of {tuple(images.shape)}")
        features.append(out.float())
    source, target = features
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"cfs: source_model gives {source.shape[1]}-d features and target_model "
                         f"{target.shape[1]}-d; their cosine needs the same width")
    return F.cosine_similarity(source, target.to(source.device), dim=1).cpu()


# ------------------------------------------------------------------------------------------------
# Resumable scoring
# ------------------------------------------------------------------------------------------------

@dataclass
class CFSResult:
    """Scores of ``paths`` (input order). ``scores`` float32 [N]: NaN where not scored (an
    unreadable image, or not reached yet). ``failed``: ``(index, path, error)`` of the images that
    could not be scored. ``done``: how many of the paths (a prefix) were processed.
    ``files``: what :func:`write_cfs_outputs` wrote, by name."""
    paths: List[str]
    scores: np.ndarray
    failed: List[Tuple[int, str, str]]
    done: int
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.done == len(self.paths)

    def ranked(self) -> Tuple[List[str], np.ndarray]:
        """The scored paths sorted by descending score (ties in input order) and their scores."""
        scored = np.flatnonzero(np.isfinite(self.scores))
        order = scored[np.argsort(-self.scores[scored], kind="stable")]
        return [self.paths[i] for i in order], self.scores[order]


def _check_paths(paths: Sequence[PathLike]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("cfs: paths must be a list of image paths, not one path")
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("cfs: paths is empty")
    for p in paths:
        if not isinstance(p, str):
            raise TypeError(f"cfs: paths must be str or os.PathLike, got {type(p).__name__} ({p!r})")
        if "\n" in p or "\r" in p:  # the list file holds one path per line
            raise ValueError(f"cfs: the path {p!r} contains a line break")
    return paths


def _fingerprint(paths: List[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _write_text(path: Path, lines: Sequence[str]) -> None:
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")))


def _save_progress(out_dir: Path, fingerprint: str, scores: np.ndarray, done: int,
                   failed: List[Tuple[int, str, str]]) -> None:
    # The scores first, the progress file last: it is the commit point. A kill between the two
    # leaves a partial file longer than the recorded count, whose first `done` values are right.
    atomic_write(out_dir / PARTIAL_FILE, lambda f: np.save(f, scores[:done]))
    state = {"format": _FORMAT, "num_paths": len(scores), "paths_sha256": fingerprint,
             "done": done, "failed": [list(item) for item in failed]}
    atomic_write(out_dir / PROGRESS_FILE, lambda f: f.write(json.dumps(state).encode()))


def _load_progress(out_dir: Path, paths: List[str], fingerprint: str):
    """(scores [N] with the done prefix filled, done, failed) from an earlier run, or a fresh state."""
    scores = np.full(len(paths), np.nan, dtype=np.float32)
    progress = out_dir / PROGRESS_FILE
    if not progress.is_file():
        return scores, 0, []
    try:
        state = json.loads(progress.read_text())
        known = state["format"] == _FORMAT
        num_paths, recorded, done = int(state["num_paths"]), state["paths_sha256"], int(state["done"])
        failed = [(int(i), str(p), str(e)) for i, p, e in state["failed"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cfs: {progress} is not a CFS progress file ({type(e).__name__}: {e}); "
                         f"delete it and {PARTIAL_FILE} to start over") from e
    if not known:
        raise ValueError(f"cfs: {progress} has format {state['format']!r}, expected {_FORMAT!r}")
    if recorded != fingerprint or num_paths != len(paths):
        raise ValueError(
            f"cfs: {out_dir} holds an unfinished or finished CFS run over a different list of paths "
            f"({num_paths} paths then, {len(paths)} now, or the same count in another order or with "
            f"other names). Score this list in another out_dir, or delete {PROGRESS_FILE} and "
            f"{PARTIAL_FILE} there to start over.")
    partial = out_dir / PARTIAL_FILE
    try:
        saved = np.load(partial, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cfs: {progress} records {done} scored images but {partial} cannot be read "
                         f"({type(e).__name__}: {e}); delete both to start over") from e
    if saved.ndim != 1 or len(saved) < done or not 0 <= done <= len(paths):
        raise ValueError(f"cfs: {partial} holds {saved.shape} scores, fewer than the {done} that "
                         f"{progress} records; delete both to start over")
    scores[:done] = saved[:done]
    return scores, done, failed


def compute_cfs_scores(source_model: nn.Module, target_model: nn.Module, paths: Sequence[PathLike],
                       out_dir: PathLike, *, root: Optional[PathLike] = None,
                       transform: Optional[Callable] = None, batch_size: int = 64, num_workers: int = 0,
                       amp: Union[str, torch.dtype, None] = None, save_every: int = 50,
                       progress: bool = True, max_batches: Optional[int] = None,
                       on_batch: Optional[Callable[[int, int], None]] = None,
                       skip_bad_images: bool = True) -> CFSResult:
    """Score every image of ``paths`` (resumably, in ``out_dir``; see the module docstring).

    ``root``: a folder the paths are relative to (they are recorded as given, as upstream's list
    holds names relative to ``<data>/images``). ``transform``: PIL image -> ``[3, H, W]``
    (default :func:`build_cfs_transform`). Both models are put in eval mode for the call (their
    modes are restored) and run on their own devices. ``amp``: an autocast dtype for the forwards
    (default none: float32 scores, so the order does not depend on rounding). ``save_every``:
    batches between two saves of the progress. ``max_batches``: stop (saved) after this many
    batches in this call, e.g. to split the work between jobs; ``on_batch(done, total)`` is called
    after each batch. Unreadable images (and non-finite scores) are recorded in ``failed`` and
    scored NaN; they never stop the run, unless ``skip_bad_images=False``: then the first
    unreadable image raises an ``ImageReadError`` naming it (what was scored before is kept).
    Returns the :class:`CFSResult` so far
    (``.complete`` tells whether every path was processed)."""
    paths = _check_paths(paths)
    if batch_size < 1:
        raise ValueError(f"cfs: batch_size must be at least 1, got {batch_size}")
    if save_every < 1:
        raise ValueError(f"cfs: save_every must be at least 1, got {save_every}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"cfs: max_batches must be at least 1 (or None), got {max_batches}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(paths)
    scores, done, failed = _load_progress(out_dir, paths, fingerprint)
    if done == len(paths):
        return CFSResult(paths, scores, sorted(failed), done)

    transform = transform if transform is not None else build_cfs_transform()
    base = Path(root) if root is not None else None
    items = [(str(base / p) if base is not None else p, 0, 0) for p in paths[done:]]
    loader = checked_loader(items, transform, batch_size, num_workers=num_workers,
                            skip_bad_images=skip_bad_images, pin_memory=torch.cuda.is_available())
    modes = [(m, m.training) for m in (source_model, target_model)]
    start, unsaved, batches = done, 0, 0
    bar = tqdm(total=len(paths), initial=done, desc="CFS", unit="img", disable=None if progress else True)
    try:
        for m, _ in modes:
            m.eval()
        for images, _, _, index, bad in loader:
            # Batches cover consecutive items in order: this one ends where the next starts.
            end = min(start + (batches + 1) * batch_size, len(paths))
            batch_failed = [(start + i, paths[start + i], error) for i, _, error in bad]
            if images is not None:
                sims = cfs_similarity(source_model, target_model, images, amp).numpy()
                rows = start + index.numpy()
                batch_failed += [(int(i), paths[i], "non-finite score (NaN or inf in a feature)")
                                 for i in rows[~np.isfinite(sims)]]
                scores[rows] = np.where(np.isfinite(sims), sims, np.nan)
            # The state moves on only once the whole batch is scored, so an interruption in the
            # middle of one leaves (and saves) a consistent prefix.
            failed += batch_failed
            bar.update(end - done)
            done, unsaved, batches = end, unsaved + 1, batches + 1
            if failed:
                bar.set_postfix(failed=len(failed), refresh=False)
            if unsaved >= save_every:
                _save_progress(out_dir, fingerprint, scores, done, failed)
                unsaved = 0
            if on_batch is not None:
                on_batch(done, len(paths))
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        # Also on an exception or Ctrl-C: what was scored is kept for the next call.
        bar.close()
        for m, training in modes:
            m.train(training)
        if unsaved:
            _save_progress(out_dir, fingerprint, scores, done, failed)
    return CFSResult(paths, scores, sorted(failed), done)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def _histogram(scores: np.ndarray, path: Path, marks: Sequence[float] = (0.5, 0.6)) -> None:
    """Histogram of the ranked (descending) ``scores``, a dashed line at the score where the top
    ``r`` share ends for each ``r`` in ``marks``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("cfs: the score histogram needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg, no pyplot: no display, no global figure state
    ax = fig.subplots()
    bins = min(100, max(10, len(scores) // 20))
    lo, hi = float(np.min(scores)), float(np.max(scores))
    # Identical scores (e.g. the same model twice) have no range to bin: give them one.
    ax.hist(scores, bins=bins, range=(lo - 0.5e-3, hi + 0.5e-3) if hi - lo < 1e-6 else None,
            color="tab:blue", alpha=0.8)
    for ratio, color in zip(marks, ("tab:red", "tab:orange", "tab:green")):
        keep = _count_for_ratio(ratio, len(scores))
        cut = scores[keep - 1]
        ax.axvline(cut, color=color, linestyle="--", linewidth=1.2,
                   label=f"top {ratio:.0%}: score >= {cut:.4f} ({keep:,} images)")
    ax.set_xlabel("CFS: cosine(source-proxy feature, target-proxy feature)")
    ax.set_ylabel("images")
    ax.set_title(f"CFS of {len(scores):,} images (high = close to the re-ID domain)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def write_cfs_outputs(result: CFSResult, out_dir: PathLike, *, histogram: bool = True) -> Dict[str, Path]:
    """Write the ranked list, its scores, the input-order scores, the failures and the histogram
    (the files of the module docstring) for a complete ``result``; returns them by name and keeps
    them in ``result.files``."""
    if not result.complete:
        raise ValueError(f"cfs: only {result.done} of {len(result.paths)} paths are scored; "
                         "finish the run (call compute_cfs_scores again) before writing the list")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, ranked = result.ranked()
    files = {"list": out_dir / LIST_FILE, "scores": out_dir / SCORES_FILE, "scores_npy": out_dir / SCORES_NPY}
    _write_text(files["list"], names)
    _write_text(files["scores"], [f"{s:.7f}" for s in ranked])
    atomic_write(files["scores_npy"], lambda f: np.save(f, result.scores))
    failed_path = out_dir / FAILED_FILE
    if result.failed:
        files["failed"] = failed_path
        _write_text(failed_path, [f"{p}\t{' '.join(e.split())}" for _, p, e in result.failed])
    else:
        failed_path.unlink(missing_ok=True)  # from an earlier run over other images
    if histogram and len(ranked):
        files["histogram"] = out_dir / HIST_FILE
        _histogram(ranked, files["histogram"])
    result.files = files
    return files


def run_cfs(source_model: nn.Module, target_model: nn.Module, paths: Sequence[PathLike],
            out_dir: PathLike, *, histogram: bool = True, **kwargs) -> CFSResult:
    """:func:`compute_cfs_scores` (resuming what ``out_dir`` holds), then, once every path is
    scored, :func:`write_cfs_outputs`. Unreadable images are named in a warning and in
    ``cfs_failed.txt``. ``kwargs`` go to :func:`compute_cfs_scores`."""
    result = compute_cfs_scores(source_model, target_model, paths, out_dir, **kwargs)
    if not result.complete:
        return result
    write_cfs_outputs(result, out_dir, histogram=histogram)
    if result.failed:
        shown = ", ".join(f"{p} ({e})" for _, p, e in result.failed[:_SHOWN])
        more = ", ..." if len(result.failed) > _SHOWN else ""
        warnings.warn(f"cfs: {len(result.failed)} of {len(result.paths)} images could not be scored "
                      f"and are left out of {LIST_FILE} (all in {result.files['failed']}): {shown}{more}",
                      stacklevel=2)
    return result
