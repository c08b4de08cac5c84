"""The trainer's hooks (engine.hooks): every hook runs at its points in the documented order, a
method's own hook sees the gradients before the optimizer step and the stepped parameters after
it, and the hooks' ``after_train`` runs (in reverse) when training fails."""

from __future__ import annotations

import pytest
import torch

from test_engine_trainer import tiny_config
from transmatcher_fast.engine.trainer import Trainer
from transmatcher_fast.methods import TrainingHook, get_method
from transmatcher_fast.methods.dino import DINOStepHook

POINTS = ("before_train", "after_backward", "after_optimizer_step", "after_step", "after_epoch",
          "after_train")
STEPS = 2


def record_calls(trainer, calls):
    """Make every hook of ``trainer`` append ``(hook class, point)`` to ``calls`` and go on."""
    for hook in trainer.hooks:
        for point in POINTS:
            def wrapped(*args, _hook=hook, _point=point, _call=getattr(hook, point)):
                calls.append((type(_hook).__name__, _point))
                return _call(*args)
            setattr(hook, point, wrapped)


class MethodHook(TrainingHook):
    """A method's hook that checks what it sees at each point."""

    def __init__(self, parts):
        self.parts, self.seen = parts, []

    def _params(self):
        return [p for part in self.parts.values() for p in part.parameters() if p.requires_grad]

    def before_train(self):
        self.seen.append(("before_train",))

    def after_backward(self, epoch, progress):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in self._params())
        self.before_step = [p.detach().clone() for p in self._params()]
        self.seen.append(("after_backward", epoch, progress))

    def after_optimizer_step(self, epoch, progress):
        assert any(not torch.equal(p, old) for p, old in zip(self._params(), self.before_step))
        self.seen.append(("after_optimizer_step", epoch, progress))

    def after_step(self, iteration, record):
        self.seen.append(("after_step", iteration, record["kind"], record["step"]))

    def after_epoch(self, epoch, record):
        self.seen.append(("after_epoch", epoch, record["kind"], record["steps"]))

    def after_train(self):
        self.seen.append(("after_train",))


@pytest.fixture
def method_hook(monkeypatch):
    """The transmatcher method supplies one :class:`MethodHook` (``box[0]`` once built)."""
    box = []

    def training_hooks(parts, config):
        box.append(MethodHook(parts))
        return box[-1:]

    monkeypatch.setattr(get_method("transmatcher"), "training_hooks", training_hooks)
    return box


def test_hooks_run_at_every_point_in_the_documented_order(data_dir, tmp_path, method_hook):
    trainer = Trainer(tiny_config(data_dir, tmp_path, "--epochs", "1", "--max-steps-per-epoch", str(STEPS)))
    names = [type(hook).__name__ for hook in trainer.hooks]
    # The engine's first, the method's after gradient clipping, the epoch's files last.
    assert names == ["RunFolderHook", "LogHook", "ClipGradients", "MethodHook", "EvalHook",
                     "CheckpointHook", "ExportsHook"]
    calls = []
    record_calls(trainer, calls)
    trainer.fit()
    step = [(name, point) for point in ("after_backward", "after_optimizer_step", "after_step")
            for name in names]
    expected = ([(name, "before_train") for name in names] + step * STEPS
                + [(name, "after_epoch") for name in names]
                + [(name, "after_train") for name in reversed(names)])
    assert calls == expected


def test_a_method_hook_sees_gradients_then_the_step_at_its_points(data_dir, tmp_path, method_hook):
    epochs = 2
    trainer = Trainer(tiny_config(data_dir, tmp_path, "--epochs", str(epochs),
                                  "--max-steps-per-epoch", str(STEPS)))
    history = trainer.fit()
    total = epochs * STEPS
    expected = [("before_train",)]
    for epoch in range(epochs):
        for i in range(STEPS):
            progress = (epoch * STEPS + i) / total
            expected += [("after_backward", epoch, progress), ("after_optimizer_step", epoch, progress),
                         ("after_step", i, "step", epoch * STEPS + i + 1)]
        expected.append(("after_epoch", epoch, "epoch", STEPS))
    expected.append(("after_train",))
    assert method_hook[0].seen == expected
    assert [r["steps"] for r in history] == [STEPS] * epochs


def test_after_train_runs_in_reverse_when_training_fails(data_dir, tmp_path, method_hook):
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", "--epochs", "1",
                                  "--max-steps-per-epoch", str(STEPS)))
    calls = []
    record_calls(trainer, calls)

    def fail(epoch):
        raise RuntimeError("stop")

    trainer.train_epoch = fail
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit()
    names = [type(hook).__name__ for hook in trainer.hooks]
    assert calls[-len(names):] == [(name, "after_train") for name in reversed(names)]
    assert method_hook[0].seen == [("before_train",), ("after_train",)]
    # The run folder is free again: a resume there starts (from scratch: no epoch was done).
    Trainer(tiny_config(data_dir, tmp_path / "run", "--resume")).close()


def test_dino_supplies_its_step_hook():
    from types import SimpleNamespace

    parts = {"student": torch.nn.Linear(2, 2), "teacher": torch.nn.Linear(2, 2)}
    hooks = get_method("dino").training_hooks(parts, SimpleNamespace())
    assert [type(hook) for hook in hooks] == [DINOStepHook]
    assert get_method("transreid").training_hooks(parts, SimpleNamespace()) == []


class StepCounter(TrainingHook):
    """A method's hook with state: the steps it has seen and the sum of their losses."""

    def __init__(self):
        self.steps, self.loss_sum = 0, 0.0

    def after_step(self, iteration, record):
        self.steps += 1
        self.loss_sum += record["loss"]

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def load_state_dict(self, state):
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]


def test_a_method_hooks_state_is_saved_and_resumed_exactly(data_dir, tmp_path, monkeypatch):
    from helpers import fit_interrupted_in_epoch

    monkeypatch.setattr(get_method("transmatcher"), "training_hooks", lambda parts, config: [StepCounter()])
    args = ("--epochs", "2", "--max-steps-per-epoch", str(STEPS))
    full = Trainer(tiny_config(data_dir, tmp_path / "full", *args))
    full.fit()
    interrupted = Trainer(tiny_config(data_dir, tmp_path / "cut", *args))
    fit_interrupted_in_epoch(interrupted, 1)
    assert interrupted.method_hooks[0].steps == STEPS
    resumed = Trainer(tiny_config(data_dir, tmp_path / "cut", *args, "--resume"))
    resumed.fit()
    counted = [(t.method_hooks[0].steps, t.method_hooks[0].loss_sum) for t in (full, resumed)]
    assert counted[0] == counted[1] and counted[0][0] == 2 * STEPS
