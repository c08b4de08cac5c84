"""Training of any re-ID method (:mod:`..methods`), resumable.

The method (``config.method``) builds the parts (feature model, comparer), the training step's
loss, the parameter groups, the optimizer and the augmentation; everything else is here, the
same for every method. One epoch: the sampler plans the batches (the graph sampler matches one
image per identity with the current model; the P x K sampler draws identities), every batch of
``num_instances`` images per identity goes through the method's training step under autocast
(+ GradScaler for fp16), gradients are clipped per part when ``clip_value`` > 0, and the schedule
sets every group's rate per epoch. At the end of every epoch a checkpoint with everything needed
to go on (parts, optimizer, scaler, schedule, sampler, RNG state) replaces the previous one
atomically, so a run killed at any time loses at most the epoch in progress, and ``resume``
repeats that epoch exactly: every random stream of an epoch is derived from (seed, epoch), and
each sample's augmentation from (seed, rank, epoch, position, index), whatever the worker count.

EXP_DIR holds ``config.yaml`` (the resolved configuration, written atomically at a fresh start and
kept on resume), ``checkpoint.pt``, ``best.pt`` (with ``--eval-every``: the model of the best mAP so
far), ``log.jsonl`` and ``tensorboard/``. A resume applies the options that
:mod:`.config` lets it change (logged as a ``"resume"`` record) and refuses any other difference
from the checkpoint's configuration (:class:`~.config.ResumeConfigError`).

Under ``torchrun`` the method's training step (holding every trained part) is one
DistributedDataParallel module; each rank takes whole batches of the sampler's plan.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import weights_io
from .._version import __version__
from ..data import dataset_root
from ..data.images import find_unreadable
from ..methods import TrainingHook, get_method
from ..methods.schedules import build_schedule
from . import checkpoint, matching, rundir
from .config import _START_OPTIONS, ResumeConfigError, TrainConfig, check_resume  # noqa: F401  (ResumeConfigError: re-exported)
from .evaluate import extract
from .init_from import init_parts_from
from .features import SKIPPED_SHOWN, autocast, parse_dtype
from .hooks import CheckpointHook, ClipGradients, EvalHook, ExportsHook, LogHook, RunFolderHook
from .samplers import AllImagesIdentitySampler, GraphSampler, RandomIdentitySampler, ShuffledBatchSampler

CHECKPOINT_NAME, LOG_NAME = rundir.CHECKPOINT_NAME, rundir.LOG_NAME
BEST_NAME, CONFIG_NAME = rundir.BEST_NAME, rundir.CONFIG_NAME
EVAL_PROTOCOL = "market"  # evaluation during training: upstream's protocol


def _init_distributed() -> tuple[int, int, int, bool]:
    """(world size, rank, local rank, whether this call started the process group); starts the
    process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        started = True
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), started
    return 1, 0, 0, started




def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds data, the method's parts, step, optimizer and the sampler from a
    :class:`TrainConfig`;
    ``fit()`` trains (resuming from ``exp_dir/checkpoint.pt`` when ``config.resume``).

    The trainer is the loop (epochs, steps, AMP, the schedule, the sampler); the rest is hooks
    (:mod:`.hooks`: run folder, logs, gradient clipping, the method's own, evaluation,
    checkpoints, exports), called at fixed points in the order of :meth:`build_hooks`.

    The trainer owns ``exp_dir`` from its construction until ``fit()`` ends (see
    :mod:`.rundir`): a second trainer there, or a fresh start in a folder that holds a run
    without ``config.overwrite``, raises :class:`~.rundir.RunDirError` at construction."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.world, self.rank, local_rank, self._owns_process_group = _init_distributed()
        self.is_main = self.rank == 0
        if config.device is not None:
            self.device = torch.device(config.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        amp = config.amp
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "none"
        self.amp_dtype = parse_dtype(amp, "amp")
        self.exp_dir = Path(config.exp_dir)
        self.run_folder = RunFolderHook(self)
        self.run_folder.claim()  # before anything slow: a second run on the folder fails at once
        try:
            self._build()
        except BaseException:
            self.run_folder.release()
            raise

    # --- construction ------------------------------------------------------------------------
    def _build(self) -> None:
        config = self.config
        _seed_everything(config.seed)

        self.method = get_method(config.method)
        self.dataset = self.method.dataset(config)
        if self.is_main:
            print(self.dataset.summary())
        self.skipped_images = self._leave_out_unreadable() if config.skip_bad_images else []
        self.model_args = self.method.model_args(config, self.dataset)
        self.parts = self.method.build(config, self.model_args)
        if config.init_from and not (config.resume and self.checkpoint_path.is_file()):
            notes = init_parts_from(self.parts, config.init_from, num_classes=self.model_args.get("num_classes"))
            if self.is_main:
                print("\n".join(notes))
        for part in self.parts.values():
            part.to(self.device)
        self.model, self.matcher = self.parts["model"], self.parts["matcher"]
        self.step_module: nn.Module = self.method.step_module(self.parts, config)
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._build_optimizer()
        # fp16 needs loss scaling; bfloat16 has float32's range and does not.
        self.scaler = (torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16
                       else None)
        self.schedule = build_schedule(config)

        self.sampler = self._build_sampler()
        # Viewpoint labels (SIE) per training image; 0 where the dataset has none.
        views = getattr(self.dataset, "train_views", None)
        self.train_views = torch.tensor(views if views is not None else [0] * len(self.dataset.train),
                                        dtype=torch.int64)
        self.train_transform = self.method.train_transform(config)
        self.loader = self.method.loader(config, self.dataset.train, self.train_transform, self.sampler,
                                         rank=self.rank)
        self.start_epoch = 0
        self.history: List[Dict[str, Any]] = []
        self.global_step = 0
        self.best: Optional[Dict[str, Any]] = None  # {"epoch", "mAP", "rank1"} of best.pt
        self.config_changes: List[Dict[str, Any]] = []  # what each resume changed
        self.logger = LogHook(self)
        self.hooks = self.build_hooks()

    def build_hooks(self) -> List[TrainingHook]:
        """The hooks in the order they run at every point (``after_train``: reversed); see
        :mod:`.hooks`. The engine's wrap the method's: gradient clipping before them, the
        evaluation and the files of the epoch after them."""
        hooks: List[TrainingHook] = [self.run_folder, self.logger]
        if self.config.clip_value > 0:
            hooks.append(ClipGradients(self.parts, self.config.clip_value))
        self.method_hooks = self.method.training_hooks(self.parts, self.config)
        hooks += self.method_hooks
        hooks += [EvalHook(self, EVAL_PROTOCOL), CheckpointHook(self), ExportsHook(self)]
        return hooks

    def _call_hooks(self, point: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, point)(*args)

    def _leave_out_unreadable(self) -> List[Tuple[str, str]]:
        """``--skip-bad-images``: every training image is decoded once, before the sampler is
        built, and the unreadable ones are left out of the dataset. The same files give the same
        list, so a resumed run samples its epochs exactly as the interrupted one did. Returns
        their ``(path, error)``; the log hook records them in log.jsonl."""
        paths = [path for path, _, _ in self.dataset.train]
        bad = find_unreadable(paths, workers=self.config.workers,
                              progress=self.config.progress and self.is_main)
        if bad:
            self.dataset.drop_train_images(path for path, _ in bad)
            if self.is_main:
                shown = "".join(f"\n  {error}" for _, error in bad[:SKIPPED_SHOWN])
                more = f"\n  ... and {len(bad) - SKIPPED_SHOWN} more" if len(bad) > SKIPPED_SHOWN else ""
                print(f"--skip-bad-images: left out {len(bad)} of {len(paths)} training images that "
                      f"cannot be read (all listed in {self.exp_dir / LOG_NAME}):{shown}{more}")
        if not self.dataset.train:
            raise ValueError(f"--skip-bad-images: none of the {len(paths)} training images can "
                             "be read")
        return bad

    def _build_sampler(self):
        """The configuration's batch sampler over the training items' identities (one identity
        for unlabelled data: then only ``pk_all``-style plain batches make sense)."""
        c = self.config
        pids = [item[1] for item in self.dataset.train]
        if c.sampler == "graph":
            return GraphSampler(pids, self._graph_distance, c.batch_size, c.num_instances, seed=c.seed)
        if c.sampler == "pk":
            return RandomIdentitySampler(pids, c.batch_size, c.num_instances, seed=c.seed)
        if c.sampler == "pk_all":
            return AllImagesIdentitySampler(pids, c.batch_size, c.num_instances, seed=c.seed)
        return ShuffledBatchSampler(len(pids), c.batch_size, seed=c.seed)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = self.method.param_groups(self.parts, self.config)
        for group in groups:
            group["initial_lr"] = group["lr"]
        return self.method.optimizer(groups, self.config)

    def _graph_distance(self, indices: List[int]) -> Tensor:
        """The graph sampler's [P, P] distances of one image per identity (rank 0 only)."""
        c = self.config
        items = [self.dataset.train[i] for i in indices]
        features = extract(self.model, items, height=c.height, width=c.width, batch_size=c.test_batch,
                           workers=c.workers, device=self.device, amp=self.amp_dtype, progress=False,
                           desc="graph sampler", transform=self.test_transform(),
                           views=self.train_views[indices].tolist()).features
        return matching.match(self.matcher, features, None, device=self.device, amp=self.amp_dtype,
                              probe_chunk=c.test_prob_batch, gallery_chunk=c.test_gal_batch,
                              distributed=False)

    # --- the experiment folder, checkpoints and resume ----------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.exp_dir / CHECKPOINT_NAME

    def test_transform(self):
        """The evaluation transform of this run's method and input size."""
        return self.method.test_transform(self.config, self.config.height, self.config.width)

    def log(self, record: Dict[str, Any]) -> None:
        """One record in ``log.jsonl`` (and TensorBoard); rank 0 only."""
        self.logger.write(record)

    def check_resume_options(self) -> Dict[str, List[Any]]:
        """The changes a resume makes to the options of ``checkpoint.pt`` (read without its
        tensors where possible); raises :class:`ResumeConfigError` where they may not change."""
        try:  # mmap: the tensors are not read
            state = weights_io.load(self.checkpoint_path, mmap=True)
        except weights_io.WeightsFileError:  # read it whole (which says what is wrong, if anything)
            state = checkpoint.load(self.checkpoint_path)
        return check_resume(dict(state.get("config", {})), self.config, self.exp_dir)

    def parts_state(self) -> Dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def state_dict(self, epochs_done: int) -> Dict[str, Any]:
        return {"epoch": epochs_done, "global_step": self.global_step, **self.parts_state(),
                "model_args": self.model_args, "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": checkpoint.rng_state(), "history": self.history,
                "config": dataclasses.asdict(self.config), "world_size": self.world,
                "best": self.best, "config_changes": self.config_changes,
                "hooks": [hook.state_dict() for hook in self.method_hooks], "version": __version__}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.start_epoch, self.global_step = state["epoch"], state["global_step"]
        self.best = state.get("best")
        self.config_changes = list(state.get("config_changes", []))
        for hook, hook_state in zip(self.method_hooks, state.get("hooks", [])):  # older checkpoints: none
            hook.load_state_dict(hook_state)

    def resume(self) -> None:
        """Every rank: the state of ``checkpoint.pt``, when there is one; rank 0 also drops the
        log's records of the unfinished epoch and logs a ``"resume"`` record of what changed."""
        if not self.checkpoint_path.is_file():
            # open_run made sure that the folder holds no run either: nothing to mix with.
            if self.is_main:
                print(f"no checkpoint at {self.checkpoint_path} and no run in {self.exp_dir}: "
                      "starting from scratch")
            return
        state = checkpoint.load(self.checkpoint_path, map_location=self.device)
        # Checked once more (rank 0 checked before building; every rank holds the same config).
        changes = check_resume(dict(state.get("config", {})), self.config, self.exp_dir)
        for name in ("exp_dir", "data_dir"):  # the same folder, written another way: no change
            if name in changes and Path(changes[name][0]).resolve() == Path(changes[name][1]).resolve():
                del changes[name]
        self.load_state_dict(state)
        if changes:
            self.config_changes.append({"epoch": self.start_epoch, "changed": changes})
        if self.is_main:
            print(f"resumed from {self.checkpoint_path}: {self.start_epoch} epochs done, "
                  f"step {self.global_step}")
            self.logger.truncate(self.start_epoch)
            if changes:
                print("resume changes " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                    for k, (old, new) in sorted(changes.items())))
            self.log({"kind": "resume", "epoch": self.start_epoch, "step": self.global_step,
                      "changed": changes, "time": time.time()})
            if not (self.exp_dir / CONFIG_NAME).is_file():  # a run of an older version
                self.write_config(state.get("config", dataclasses.asdict(self.config)))

    def write_config(self, values: Dict[str, Any]) -> Path:
        """``EXP_DIR/config.yaml``: the resolved configuration (what ``--config`` reads), written
        through a temporary and a rename. The start options (resume, overwrite) are left out."""
        import yaml

        values = {k: v for k, v in values.items() if k not in _START_OPTIONS}
        text = (f"# transmatcher-fast {__version__}: the configuration of this run "
                f"(transmatcher-fast train --config {CONFIG_NAME})\n"
                + yaml.safe_dump(values, sort_keys=False, default_flow_style=False))
        return weights_io.atomic_write(self.exp_dir / CONFIG_NAME, lambda file: file.write(text), "w",
                                       temporary=rundir.config_temporary(self.exp_dir))

    # --- training ----------------------------------------------------------------------------
    def _set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(self.optimizer, epoch)
        self.sampler.set_epoch(epoch)
        # The augmentation streams of an epoch depend on (seed, epoch, rank) only, so a resumed
        # epoch repeats the interrupted one.
        # Each sample's augmentation comes from (seed, rank, epoch, position, index), in
        # whichever process loads it (data.make_loader), so the worker count changes nothing.
        seed = (self.config.seed * 1_000_003 + epoch) * 1009 + self.rank
        self.loader.generator.manual_seed(seed)
        self.loader.dataset.set_epoch(epoch)

    def _train_mode(self) -> None:
        self.step_module.train()
        if self.config.freeze_bn:
            # Upstream calls model.eval() every iteration: the feature model's BatchNorm keeps its
            # (ImageNet) running statistics while its affine parameters still train.
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def train_step(self, inputs: tuple, epoch: int, progress: float) -> tuple[float, float]:
        """One optimisation step on the method's step inputs; ``progress`` is the fraction of
        training done before it, ``iteration / total_iterations`` (for the hooks' per-step values,
        such as a teacher's momentum, which upstream indexes by the 0-based iteration)."""
        with autocast(self.device, self.amp_dtype):
            loss_rows, acc_rows = self.step_module(*inputs)
        # Upstream averages the rows whose loss is finite.
        finite = torch.isfinite(loss_rows)
        loss = torch.where(finite, loss_rows, torch.zeros_like(loss_rows)).sum() / finite.sum().clamp_min(1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # the hooks see (and clip) the true gradients
        else:
            loss.backward()
        self._call_hooks("after_backward", epoch, progress)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._call_hooks("after_optimizer_step", epoch, progress)
        acc = acc_rows[finite & torch.isfinite(acc_rows)]
        return loss.item(), acc.float().mean().item() if acc.numel() else float("nan")

    def _mean_over_ranks(self, *values: float) -> List[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def train_epoch(self, epoch: int) -> Dict[str, Any]:
        c = self.config
        self._set_epoch(epoch)
        start = time.perf_counter()
        batches = iter(self.loader)  # the graph sampler plans the epoch here
        plan_seconds = time.perf_counter() - start
        total = len(self.loader) if c.max_steps_per_epoch is None else min(len(self.loader), c.max_steps_per_epoch)
        bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.schedule.end}",
                   disable=None if c.progress and self.is_main else True, leave=False)
        loss_sum = acc_sum = 0.0
        steps = images_seen = acc_steps = 0
        tick = epoch_start = time.perf_counter()
        total_steps = total * self.schedule.end
        for batch in batches:
            if steps >= total:
                break
            self._train_mode()
            self.schedule.set_iteration(self.optimizer, epoch, steps, total)
            inputs, count = self.method.step_inputs(batch, epoch, self.train_views, self.device)
            loss, acc = self.train_step(inputs, epoch, (epoch * total + steps) / max(total_steps, 1))
            steps += 1
            self.global_step += 1
            images_seen += count
            loss_sum += loss
            if math.isfinite(acc):
                acc_sum, acc_steps = acc_sum + acc, acc_steps + 1
            now = time.perf_counter()
            rate = count * self.world / max(now - tick, 1e-9)
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{rate:.1f}")
            self._call_hooks("after_step", steps - 1, {
                "kind": "step", "epoch": epoch, "step": self.global_step, "loss": loss, "acc": acc,
                "lr": self.optimizer.param_groups[-1]["lr"], "images_per_s": rate, "time": time.time()})
        bar.close()
        seconds = time.perf_counter() - epoch_start
        mean_loss, mean_acc = self._mean_over_ranks(loss_sum / max(steps, 1),
                                                    acc_sum / acc_steps if acc_steps else float("nan"))
        return {"kind": "epoch", "epoch": epoch, "step": self.global_step, "loss": mean_loss, "acc": mean_acc,
                "lr": self.optimizer.param_groups[-1]["lr"], "steps": steps,
                "seconds": seconds, "plan_seconds": plan_seconds,
                "images_per_s": images_seen * self.world / max(seconds, 1e-9)}

    def fit(self) -> List[Dict[str, Any]]:
        """Train until the schedule ends; returns the epoch records (also in ``log.jsonl``).
        EXP_DIR stays locked until it returns or raises (the run-folder hook)."""
        try:
            self._call_hooks("before_train")
            epoch = self.start_epoch
            while epoch < self.schedule.end:
                record = self.train_epoch(epoch)
                self.schedule.after_epoch(epoch, record["loss"])
                self.history.append(record)
                self._call_hooks("after_epoch", epoch, record)
                epoch += 1
                if self.world > 1:
                    dist.barrier()
        finally:
            self._after_train()
        return self.history

    def _after_train(self) -> None:
        """Every hook's ``after_train``, in reverse order, even when one of them raises (the
        first error is raised once all have run)."""
        error = None
        for hook in reversed(self.hooks):
            try:
                hook.after_train()
            except BaseException as failure:
                error = error or failure
        if error is not None:
            raise error

    def provenance(self, epoch: Optional[int] = None) -> Dict[str, Any]:
        """What a result of this run came from: package version, model configuration, checkpoint,
        dataset, protocol and date."""
        c = self.config
        return {"package": "transmatcher_fast", "version": __version__, "method": c.method,
                "model": {k: getattr(c, k) for k in self.method.model_options},
                "checkpoint": str(self.checkpoint_path), "epochs_done": None if epoch is None else epoch + 1,
                "global_step": self.global_step, "dataset": c.dataset,
                "data_dir": str(dataset_root(c.data_dir, c.dataset)),
                "num_query": len(self.dataset.query), "num_gallery": len(self.dataset.gallery),
                "protocol": EVAL_PROTOCOL, "seed": c.seed, "config": str(self.exp_dir / CONFIG_NAME),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def leave_process_group(self) -> None:
        """Destroy the process group when this trainer started it (after a refusal: at once)."""
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def close(self) -> None:
        """Ends distributed training cleanly; call it on every rank after a successful ``fit()``.
        It drops the DistributedDataParallel wrapper (its reducer holds the process group and
        pending gloo work) and, when this trainer started the group, waits for every rank and
        destroys it. A group left to interpreter shutdown can abort the process with
        ``std::terminate``. After a failure, skip it: torchrun stops the other ranks."""
        self.run_folder.release()
        if isinstance(self.step_module, nn.parallel.DistributedDataParallel):
            self.step_module = self.step_module.module
            gc.collect()
        if self._owns_process_group and dist.is_initialized():
            dist.barrier()
            self.leave_process_group()
