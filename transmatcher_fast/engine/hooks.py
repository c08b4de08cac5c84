"""The training loop's hooks: what happens around the loop, written once for every method.

:class:`~.trainer.Trainer` runs the loop (epochs, steps, AMP, the schedule, the sampler) and calls
its hooks at these points, each hook in the order of :meth:`~.trainer.Trainer.build_hooks`:

- ``before_train()``: once, when ``fit()`` starts;
- ``after_backward(epoch, progress)``: every step, after the backward pass (gradients unscaled
  under AMP), before the optimizer step;
- ``after_optimizer_step(epoch, progress)``: every step, after the optimizer step;
- ``after_step(iteration, record)``: every step, with its ``"step"`` record (loss, accuracy,
  learning rate, speed); ``iteration`` counts the epoch's steps from 0;
- ``after_epoch(epoch, record)``: after every epoch, with its ``"epoch"`` record (already in
  ``trainer.history``; the schedule has seen its loss);
- ``after_train()``: once, when ``fit()`` ends or raises, in *reverse* order, so that what a hook
  set up first (the run folder's lock) is torn down last.

``progress`` is ``iteration / total_iterations`` of the step (0-based: the fraction of training
done before it). The order is:

1. :class:`RunFolderHook`: locks EXP_DIR, clears a killed run's temporaries, writes
   ``config.yaml`` at a fresh start, or resumes the run from ``checkpoint.pt``;
2. :class:`LogHook`: ``log.jsonl`` and TensorBoard (opened after the resume: it purges the
   events after the checkpoint's step), the step and epoch records and the epoch's line;
3. :class:`ClipGradients` (``clip_value`` > 0): each part's gradient norm clipped;
4. the method's own hooks (:meth:`~..methods.base.Method.training_hooks`: a method's own
   gradient clipping, frozen layers, a teacher's EMA);
5. :class:`EvalHook`: evaluation every ``eval_every`` epochs, ``best.pt`` at the best mAP;
6. :class:`CheckpointHook`: ``checkpoint.pt`` after every epoch (after the evaluation, whose
   best mAP it holds);
7. :class:`ExportsHook`: the method's own files beside it (:meth:`~..methods.base.Method.exports`).

Only rank 0 writes in EXP_DIR; every hook of a method runs on every rank (the parts stay equal).
The base class is :class:`~..methods.base.TrainingHook` (methods sit below the engine and
subclass it too).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
import weakref
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from .. import weights_io
from ..methods.base import TrainingHook
from . import checkpoint, rundir
from .evaluate import evaluate

__all__ = ["TrainingHook", "RunFolderHook", "LogHook", "ClipGradients", "EvalHook", "CheckpointHook",
           "ExportsHook"]


class _TrainerHook(TrainingHook):
    """An engine hook: it reads and updates the trainer (held weakly: the trainer holds it)."""

    def __init__(self, trainer):
        self.trainer = weakref.proxy(trainer)


class RunFolderHook(_TrainerHook):
    """EXP_DIR owned by the run (see :mod:`.rundir`): rank 0 locks it from the trainer's
    construction (:meth:`claim`) until ``fit()`` ends; a resume restores the trainer there."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.run: Optional[rundir.RunDir] = None

    def claim(self) -> None:
        """Rank 0 locks EXP_DIR (the other ranks write nothing there) and checks that the run may
        start there (none is replaced without ``overwrite``; a resume's options fit the
        checkpoint's); if not, every rank raises the same :class:`~.rundir.RunDirError`."""
        t = self.trainer
        error = None
        if t.is_main and self.run is None:
            try:
                self.run = rundir.open_run(t.exp_dir, resume=t.config.resume, overwrite=t.config.overwrite)
                if self.run.mode == "resume" and t.checkpoint_path.is_file():
                    try:
                        t.check_resume_options()
                    except BaseException:
                        self.release()
                        raise
            except rundir.RunDirError as failure:  # (ResumeConfigError too: its class travels)
                error = (type(failure), str(failure))
        if t.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            t.leave_process_group()
            kind, message = error
            raise kind(message)

    def release(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.release()

    def before_train(self) -> None:
        t = self.trainer
        self.claim()  # again, when a previous fit() released it
        if t.is_main:
            stale = rundir.temporaries(t.exp_dir)
            removed = self.run.prepare()
            if stale:
                print(f"removed {len(stale)} temporary files that a killed run left in {t.exp_dir}")
            if self.run.mode == "overwrite" and len(removed) > len(stale):
                print(f"--overwrite: removed the previous run's {len(removed) - len(stale)} files "
                      f"from {t.exp_dir}")
            if self.run.mode != "resume" or not t.checkpoint_path.is_file():
                t.write_config(dataclasses.asdict(t.config))
        if t.config.resume:
            t.resume()

    def after_train(self) -> None:
        self.release()


class LogHook(_TrainerHook):
    """``log.jsonl`` (one JSON record a line; rank 0) and, with ``tensorboard``, every number
    of a record as a TensorBoard scalar ``kind/name``; other hooks write through :meth:`write`."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.writer = None

    @property
    def path(self):
        return self.trainer.exp_dir / rundir.LOG_NAME

    def write(self, record: Dict[str, Any]) -> None:
        if not self.trainer.is_main:
            return
        with open(self.path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if self.writer is not None:
            kind = record.get("kind")
            step = record.get("step", record.get("epoch"))
            for key, value in record.items():
                if key not in ("kind", "epoch", "step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def truncate(self, epochs_done: int) -> None:
        """Drop the records of the epoch a killed run did not finish (it runs again), and any
        record that is not a whole JSON line: a kill or a full disk can leave the last one cut."""
        path = self.path
        if not path.is_file():
            return
        kept, torn = [], 0
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if not isinstance(record, dict):
                torn += 1
            elif record.get("epoch", 0) < epochs_done:
                kept.append(line)
        if torn:
            print(f"{path}: dropped {torn} incomplete record{'s' if torn > 1 else ''} "
                  "(cut by a kill or a full disk)")
        text = "".join(line + "\n" for line in kept)
        weights_io.atomic_write(path, lambda file: file.write(text), "w",
                                temporary=rundir.log_temporary(self.trainer.exp_dir))

    def before_train(self) -> None:
        t = self.trainer
        if t.is_main and t.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging JSON lines only "
                              "(pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(t.exp_dir / rundir.TENSORBOARD_NAME),
                                            purge_step=t.global_step + 1)
        self._log_skipped_images()

    def _log_skipped_images(self) -> None:
        """One record of the images ``--skip-bad-images`` left out; a resumed run that finds
        the same ones does not list them again."""
        t = self.trainer
        if not (t.skipped_images and t.is_main):
            return
        images = [{"path": path, "error": error} for path, error in t.skipped_images]
        if self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("kind") == "skipped_images" \
                        and record.get("images") == images:
                    return
        self.write({"kind": "skipped_images", "epoch": t.start_epoch, "step": t.global_step,
                    "count": len(images), "images": images, "time": time.time()})

    def after_step(self, iteration: int, record: Dict[str, Any]) -> None:
        if record["step"] % self.trainer.config.log_every == 0 or iteration == 0:
            self.write(record)

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        self.write(record)
        if self.trainer.is_main:
            print(f"epoch {epoch + 1}: loss {record['loss']:.4f}  acc {record['acc']:.3f}  "
                  f"lr {record['lr']:.2e}  {record['images_per_s']:.1f} img/s  "
                  f"({record['seconds']:.1f} s + {record['plan_seconds']:.1f} s sampling)")

    def after_train(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()


class ClipGradients(TrainingHook):
    """Each part's gradients clipped to total norm ``clip_value`` (``clip_grad_norm_`` per
    part, as upstream), before the optimizer step."""

    def __init__(self, parts, clip_value: float):
        self.parts, self.clip_value = parts, clip_value

    def after_backward(self, epoch: int, progress: float) -> None:
        for module in self.parts.values():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.clip_value)


class EvalHook(_TrainerHook):
    """Rank 0, every ``eval_every`` epochs: query/gallery metrics with :func:`.evaluate.evaluate`,
    an ``"eval"`` record, and ``best.pt`` when the mAP is the best so far (``trainer.best``).
    Every random stream is put back afterwards, so training goes on as without the evaluation."""

    def __init__(self, trainer, protocol: str):
        super().__init__(trainer)
        self.protocol = protocol

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        t = self.trainer
        every = t.config.eval_every
        if t.is_main and every > 0 and (epoch + 1) % every == 0:
            self.evaluate(epoch)

    def evaluate(self, epoch: int) -> Dict[str, Any]:
        t, c = self.trainer, self.trainer.config
        rng = checkpoint.rng_state()
        try:
            result = evaluate(t.model, t.matcher, t.dataset.query, t.dataset.gallery,
                              height=c.height, width=c.width, batch_size=c.test_batch,
                              workers=c.workers, device=t.device, amp=t.method.eval_amp or t.amp_dtype,
                              probe_chunk=c.test_prob_batch, gallery_chunk=c.test_gal_batch,
                              protocol=self.protocol, progress=False, transform=t.test_transform(),
                              query_views=getattr(t.dataset, "query_views", None),
                              gallery_views=getattr(t.dataset, "gallery_views", None))
        finally:
            checkpoint.set_rng_state(rng)
        metrics = result.metrics
        improved = t.best is None or metrics["mAP"] > t.best["mAP"]
        if improved:
            t.best = {"epoch": epoch, "mAP": float(metrics["mAP"]), "rank1": float(metrics["rank1"])}
            checkpoint.save_atomic({"epoch": epoch + 1, "global_step": t.global_step, **t.parts_state(),
                                    "model_args": t.model_args, "config": dataclasses.asdict(c),
                                    "metrics": metrics, "provenance": t.provenance(epoch)},
                                   t.exp_dir / rundir.BEST_NAME)
        best = t.best
        record = {"kind": "eval", "epoch": epoch, "step": t.global_step,
                  **{k: metrics[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP") if k in metrics},
                  "best_mAP": best["mAP"], "best_epoch": best["epoch"], "is_best": improved,
                  "seconds": metrics.get("features_seconds", 0.0) + metrics.get("matching_seconds", 0.0),
                  "provenance": t.provenance(epoch), "time": time.time()}
        t.log(record)
        print(f"eval after epoch {epoch + 1}: rank-1 {metrics['rank1']:.3f}  mAP {metrics['mAP']:.3f}"
              + ("  (best so far: best.pt)" if improved else f"  (best mAP {best['mAP']:.3f}, "
                                                           f"epoch {best['epoch'] + 1})"))
        return record


class CheckpointHook(_TrainerHook):
    """Rank 0, after every epoch: ``checkpoint.pt`` (everything a resume needs, see
    :meth:`~.trainer.Trainer.state_dict`) replaces the previous one atomically."""

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        t = self.trainer
        if t.is_main:
            checkpoint.save_atomic(t.state_dict(epoch + 1), t.checkpoint_path)


class ExportsHook(_TrainerHook):
    """Rank 0, after every epoch: the method's own files (:meth:`~..methods.base.Method.exports`)
    beside the checkpoint, each written atomically."""

    def after_epoch(self, epoch: int, record: Dict[str, Any]) -> None:
        t = self.trainer
        if t.is_main:
            for name, state in t.method.exports(t.parts, t.config, epoch + 1).items():
                checkpoint.save_atomic(state, t.exp_dir / name)
