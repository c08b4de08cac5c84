"""DINO pre-training as a method of the engine: per-iteration schedules against upstream's arrays,
the multi-resolution ViT, one engine step against upstream's ``train_one_epoch`` written out by
hand, exact resume, DDP (student and teacher in sync), CFS-list filtering, the method's refusals,
and the checkpoint loading as pre-trained weights (TransReID fine-tuning, continued pre-training)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import fit_interrupted_in_epoch, torchrun_two
from transmatcher_fast.cli import build_parser
from transmatcher_fast.engine.trainer import Trainer, TrainConfig
from transmatcher_fast.methods import get_method
from transmatcher_fast.methods.dino import load_dino_weights, view_agreement
from transmatcher_fast.methods.optim_utils import cancel_gradients_last_layer, clip_gradients, get_params_groups
from transmatcher_fast.methods.schedules import DINOSchedule, build_schedule, dino_teacher_momentum
from transmatcher_fast.models.vit import MultiResolutionViT, arch_config
from upstream_dino import cosine_scheduler

# A tiny DINO: 64 x 32 global crops (4 x 2 patches), 2 local crops of 32 x 16 (2 x 1), 64 prototypes.
TINY = ["-d", "market", "-a", "vit_tiny_patch16", "--height", "64", "--width", "32", "-b", "8", "-j", "0",
        "--out-dim", "64", "--local-crops", "2", "--dino-warmup-epochs", "1", "--no-progress",
        "--no-tensorboard", "--log-every", "1"]
ENV_THREADS = {"OMP_NUM_THREADS": "1", "TRANSMATCHER_FAST_BACKEND": "cpu"}


def dino_config(data_dir, exp_dir, *extra) -> TrainConfig:
    args = build_parser().parse_args(["pretrain", *TINY, "--data-dir", str(data_dir), "--exp-dir",
                                      str(exp_dir), *extra])
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k not in ("command", "run", "config")})


def step_losses(exp_dir, epoch=None):
    records = map(json.loads, (Path(exp_dir) / "log.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "step" and (epoch is None or r["epoch"] == epoch)]


# --- schedules -------------------------------------------------------------------------------

def test_dino_schedule_is_upstreams_cosine_scheduler_per_iteration():
    """lr: warm-up from 0 then cosine to min_lr; wd: 0.04 -> 0.4; the values of main_dino.py's
    arrays at every global iteration, computed from (epoch, iteration, n) alone."""
    epochs, n, peak = 5, 7, 1e-3
    schedule = DINOSchedule(epochs, peak, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4)
    lr = cosine_scheduler(peak, 1e-6, epochs, n, warmup_epochs=2)
    wd = cosine_scheduler(0.04, 0.4, epochs, n)
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "name": "regularized", "lr": 0.0},
              {"params": [torch.zeros(1, requires_grad=True)], "name": "not_regularized", "lr": 0.0,
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups)
    for epoch in range(epochs):
        schedule.set_epoch(optimizer, epoch)
        for i in range(n):
            schedule.set_iteration(optimizer, epoch, i, n)
            it = epoch * n + i
            assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr[it]] * 2, rel=1e-12, abs=1e-15)
            assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(wd[it], rel=1e-12)
            assert optimizer.param_groups[1]["weight_decay"] == 0.0  # never regularised
    # The teacher's momentum: upstream's curve, at the step's 0-based iteration.
    momentum = cosine_scheduler(0.996, 1, epochs, n)
    total = epochs * n
    for it in range(total - 1):
        assert dino_teacher_momentum(0.996, it / total) == pytest.approx(momentum[it], abs=1e-12)
    assert dino_teacher_momentum(0.996, 0.0) == pytest.approx(0.996) and dino_teacher_momentum(0.996, 1.0) == 1.0


def test_dino_schedule_from_the_config_scales_lr_by_the_batch():
    config = TrainConfig(method="dino", batch_size=64, epochs=100)
    schedule = build_schedule(config)
    assert isinstance(schedule, DINOSchedule) and schedule.end == 100
    assert schedule.peak_lr == pytest.approx(0.0005 * 64 / 256)  # 1e-3 for 8 GPUs x 64 upstream
    assert (schedule.min_lr, schedule.warmup_epochs, schedule.weight_decay, schedule.weight_decay_end) == \
        (1e-6, 10, 0.04, 0.4)
    with pytest.raises(ValueError, match="schedule 'dino' is DINO pre-training's"):
        TrainConfig(method="transreid", schedule="dino")


# --- the model ---------------------------------------------------------------------------------

def _upstream_interpolate(pos_embed, img_size, h, w, patch=16):
    """TransReID-SSL dino/vision_transformer.py ``interpolate_pos_encoding`` (its (x, h, w))."""
    oh, ow = img_size[0] // patch, img_size[1] // patch
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, oh, ow, dim).permute(0, 3, 1, 2),
                         scale_factor=(h0 / oh, w0 / ow), mode="bicubic")
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@pytest.mark.parametrize("stem_conv", [False, True])
def test_multi_resolution_vit_resizes_the_position_embedding_as_upstream(stem_conv):
    torch.manual_seed(0)
    vit = MultiResolutionViT(**arch_config("vit_tiny_patch16"), img_size=(256, 128), stem_conv=stem_conv).eval()
    torch.nn.init.normal_(vit.pos_embed)
    assert torch.equal(vit.resized_pos_embed(8, 4), _upstream_interpolate(vit.pos_embed, (256, 128), 128, 64))
    local = torch.randn(3, 3, 128, 64)
    tokens = vit.embed(local)
    assert tokens.shape == (3, 1 + 8 * 4, 192)
    # Written out: patches + cls, plus the resized embedding.
    embedding = vit.patch_embed
    patches = embedding.proj(embedding.conv(local) if stem_conv else local).flatten(2).transpose(1, 2)
    expected = torch.cat((vit.cls_token.expand(3, -1, -1), patches), 1) + vit.resized_pos_embed(8, 4)
    assert torch.allclose(tokens, expected, atol=1e-6)
    # At img_size it is the plain VisionTransformer.
    image = torch.randn(2, 3, 256, 128)
    assert torch.equal(vit(image), super(MultiResolutionViT, vit).forward(image))
    out = vit.train()(local)
    (out * torch.randn_like(out)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    assert out.shape == (3, 192) and vit.pos_embed.grad.abs().sum() > 0


def test_view_agreement_counts_the_loss_pairs():
    # 3 crops of a batch of 2 images, 4 prototypes; teacher argmax per global view.
    teacher = torch.tensor([[9., 0, 0, 0], [0, 9., 0, 0], [0, 0, 9., 0], [0, 0, 0, 9.]])  # view 0: 0, 1; view 1: 2, 3
    student = torch.tensor([[0, 0, 1., 0], [0, 0, 0, 1.],   # view 0 = teacher view 1: 2 hits of 2
                            [1., 0, 0, 0], [0, 0, 0, 1.],   # view 1: 1 hit against view 0
                            [1., 0, 0, 0], [0, 0, 1., 0]])  # view 2: 1 against view 0, 0 against 1
    # pairs (t0, s1) 0.5, (t0, s2) 0.5, (t1, s0) 1.0, (t1, s2) 0.0
    assert view_agreement(student, teacher, torch.zeros(1, 4), 3).item() == pytest.approx(0.5)


# --- training -----------------------------------------------------------------------------------

def test_engine_steps_are_upstreams_train_one_epoch(data_dir, tmp_path):
    """Two epochs of two steps through the engine, and the same batches through main_dino.py's
    loop written out by hand (lr/wd from cosine_scheduler arrays, group 0 regularised, teacher on
    the global crops, per-parameter clipping, last layer frozen in epoch 0, EMA): the same
    losses, student, teacher and centre."""
    config = dino_config(data_dir, tmp_path / "run", "--epochs", "2", "--max-steps-per-epoch", "2",
                         "--drop-path", "0", "--clip-grad", "0.05", "--no-norm-last-layer")
    trainer = Trainer(config)
    student, teacher = copy.deepcopy(trainer.parts["student"]), copy.deepcopy(trainer.parts["teacher"])
    dino_loss = copy.deepcopy(trainer.parts["dino_loss"])
    batches = []
    for epoch in range(2):
        trainer._set_epoch(epoch)
        batches.append([b for b, _ in zip(trainer.loader, range(2))])
    trainer.fit()

    n, epochs, peak = 2, 2, 0.0005 * 8 / 256
    lr = cosine_scheduler(peak, 1e-6, epochs, n, warmup_epochs=1)
    wd = cosine_scheduler(0.04, 0.4, epochs, n)
    momentum_schedule = cosine_scheduler(0.996, 1, epochs, n)
    optimizer = torch.optim.AdamW(get_params_groups(student))
    losses = []
    for epoch in range(epochs):
        for i, (images, _) in enumerate(batches[epoch]):
            it = n * epoch + i
            for g, group in enumerate(optimizer.param_groups):
                group["lr"] = lr[it]
                if g == 0:
                    group["weight_decay"] = wd[it]
            student.train(), teacher.train()
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
            optimizer.zero_grad()
            loss.backward()
            clip_gradients(student, 0.05)
            cancel_gradients_last_layer(epoch, student, 1)
            optimizer.step()
            m = momentum_schedule[it]  # upstream's array, by the 0-based iteration
            with torch.no_grad():
                for q, k in zip(student.parameters(), teacher.parameters()):
                    k.data.mul_(m).add_((1 - m) * q.detach().data)
            losses.append(loss.item())
    assert step_losses(tmp_path / "run") == pytest.approx(losses, rel=1e-5)
    for name, ours, theirs in (("student", trainer.parts["student"], student),
                               ("teacher", trainer.parts["teacher"], teacher),
                               ("dino_loss", trainer.parts["dino_loss"], dino_loss)):
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, key)
    # The logged "acc" (view agreement) is a fraction; the teacher is not the student any more.
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["acc"] <= 1 for r in records if r["kind"] == "step")
    assert not torch.equal(trainer.parts["student"].backbone.pos_embed, trainer.parts["teacher"].backbone.pos_embed)


def test_dino_resumes_its_next_epoch_exactly(data_dir, tmp_path):
    """Interrupted after epoch 1 (KeyboardInterrupt from train_epoch), then --resume: the second
    epoch's step losses and the student, teacher and centre equal those of one run."""
    extra = ("--epochs", "2", "--max-steps-per-epoch", "2")
    full = Trainer(dino_config(data_dir, tmp_path / "full", *extra))
    full.fit()
    fit_interrupted_in_epoch(Trainer(dino_config(data_dir, tmp_path / "split", *extra)), 1)
    resumed = Trainer(dino_config(data_dir, tmp_path / "split", "--resume", *extra))
    resumed.fit()
    assert step_losses(tmp_path / "split", 1) == step_losses(tmp_path / "full", 1)
    assert len(step_losses(tmp_path / "full")) == 4 and all(map(math.isfinite, step_losses(tmp_path / "full")))
    for name in ("student", "teacher", "dino_loss"):
        for (key, a), b in zip(full.parts[name].state_dict().items(), resumed.parts[name].state_dict().values()):
            assert torch.equal(a, b), (name, key)
    assert full.parts["dino_loss"].center.abs().sum() > 0


WORKER = '''
import json, sys
import torch, torch.distributed as dist
from transmatcher_fast.cli import build_parser
from transmatcher_fast.engine.trainer import Trainer, TrainConfig
argv, out = sys.argv[1:-1], sys.argv[-1]
args = build_parser().parse_args(["pretrain"] + argv)
trainer = Trainer(TrainConfig.from_dict({k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}))
history = trainer.fit()
sums = {name: torch.stack([t.detach().double().sum() for t in trainer.parts[name].state_dict().values()])
        for name in ("student", "teacher", "dino_loss")}
report = {}
for name, checksum in sums.items():
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    report[name] = [g.tolist() for g in gathered]
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"world_size": dist.get_world_size(), "steps": history[-1]["steps"], **report}, f)
trainer.close()
'''


def test_dino_trains_in_sync_under_torchrun(data_dir, tmp_path):
    import os

    worker, out = tmp_path / "dino_ddp_worker.py", tmp_path / "ddp.json"
    worker.write_text(WORKER)
    env = {**os.environ, **ENV_THREADS}
    env.pop("TRITON_INTERPRET", None)
    result = torchrun_two(worker, *TINY, "--data-dir", data_dir, "--exp-dir", tmp_path / "run", "--epochs", "1",
                          "--max-steps-per-epoch", "2", out, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["steps"] == 2
    for name in ("student", "teacher", "dino_loss"):
        rank0, rank1 = report[name]
        assert rank0 == rank1, name


# --- data, refusals, weights -----------------------------------------------------------------

def test_cfs_list_keeps_the_top_of_the_training_images(data_dir, tmp_path):
    method = get_method("dino")
    everything = method.dataset(dino_config(data_dir, tmp_path))
    names = [Path(p).relative_to(everything.root).as_posix() for p, _, _ in everything.train][::-1]
    listed = tmp_path / "cfs_list.txt"
    listed.write_text("\n".join(names) + "\n")
    top = method.dataset(dino_config(data_dir, tmp_path, "--filter-list", str(listed), "--keep", "10"))
    assert [Path(p).relative_to(top.root).as_posix() for p, _, _ in top.train] == names[:10]
    assert "CFS list cfs_list.txt: 10 images (the first 10 of 64: keep_num 10)" in top.summary()
    half = method.dataset(dino_config(data_dir, tmp_path, "--filter-list", str(listed), "--keep-ratio", "0.5"))
    assert len(half.train) == 32
    # Upstream's pickled list reads the same (a list of str, no class loaded).
    import pickle
    pickled = tmp_path / "CFS_list.pkl"
    pickled.write_bytes(pickle.dumps(names))
    assert len(method.dataset(dino_config(data_dir, tmp_path, "--filter-list", str(pickled), "--keep", "5")).train) == 5
    listed.write_text("bounding_box_train/not_there.jpg\n" + "\n".join(names))
    with pytest.raises(FileNotFoundError, match=r"cfs_list.txt: 1 of the 65 images it keeps are not training images"):
        method.dataset(dino_config(data_dir, tmp_path, "--filter-list", str(listed)))
    with pytest.raises(ValueError, match="keep_num 100: .* lists only 65 images"):
        method.dataset(dino_config(data_dir, tmp_path, "--filter-list", str(listed), "--keep", "100"))
    with pytest.raises(ValueError, match="keep_num / keep_ratio keep the top of a CFS list: give filter_list"):
        dino_config(data_dir, tmp_path, "--keep", "3")


def test_dino_refuses_what_it_cannot_train(data_dir, tmp_path):
    with pytest.raises(ValueError, match="eval_every 1: the unlabelled images of dataset 'images' have no query/gallery"):
        TrainConfig(method="dino", dataset="images", eval_every=1)
    with pytest.raises(ValueError, match="clip_value 1.0 .*set dino_clip_grad"):
        TrainConfig(method="dino", clip_value=1.0)
    with pytest.raises(ValueError, match="sampler 'pk'"):
        TrainConfig(method="dino", sampler="pk")
    with pytest.raises(ValueError, match="arch 'resnet50'"):
        TrainConfig(method="dino", arch="resnet50")
    with pytest.raises(ValueError, match="dino_warmup_epochs 10 \\(more than the 5 epochs\\)"):
        TrainConfig(method="dino", epochs=5)
    with pytest.raises(ValueError, match="dino_global_scale must satisfy"):
        TrainConfig(method="dino", dino_global_scale=(0.5, 0.2))
    assert TrainConfig(method="dino", dino_local_scale=[0.1, 0.3]).dino_local_scale == (0.1, 0.3)
    TrainConfig(method="dino", dataset="market1501", eval_every=1)  # a labelled set evaluates


def test_checkpoint_loads_as_pretrained_weights_for_fine_tuning_and_pretraining(data_dir, tmp_path):
    """checkpoint.pt and DINO's layout (teacher.pth: {'teacher': backbone.* / head.*}) load into
    TransReID's backbone (pos_embed resized by the hw_ratio rule) and into a new DINO student
    (backbone, head, centre)."""
    from transmatcher_fast.engine import checkpoint
    from transmatcher_fast.methods.dino import teacher_checkpoint
    from transmatcher_fast.models.transreid import TransReID

    trainer = Trainer(dino_config(data_dir, tmp_path / "run", "--epochs", "1", "--max-steps-per-epoch", "1"))
    trainer.fit()
    teacher = trainer.parts["teacher"]
    exported = checkpoint.save_atomic(teacher_checkpoint(trainer.parts, 1, {}), tmp_path / "teacher.pth")
    for path in (trainer.checkpoint_path, exported):
        fine = TransReID(8, arch="vit_tiny_patch16", img_size=(64, 32), pretrained=str(path))
        for key, value in teacher.backbone.state_dict().items():
            assert torch.equal(fine.base.state_dict()[key], value), key
        tall = TransReID(8, arch="vit_tiny_patch16", img_size=(96, 32), pretrained=str(path), pretrain_hw_ratio=2)
        assert tall.base.pos_embed.shape == (1, 1 + 6 * 2, 192)
        again = get_method("dino").build(dino_config(data_dir, tmp_path / "next", "--pretrained", str(path)), {})
        for key, value in teacher.state_dict().items():
            assert torch.equal(again["student"].state_dict()[key], value), key
            assert torch.equal(again["teacher"].state_dict()[key], value), key
        assert torch.equal(again["dino_loss"].center, trainer.parts["dino_loss"].center)
    wrong = get_method("dino").build(dino_config(data_dir, tmp_path / "x", "--out-dim", "32"), {})["student"]
    with pytest.raises(ValueError, match="teacher.pth: the weights do not fit the model"):
        load_dino_weights(wrong, str(exported))
