"""The method seam: every method trains, resumes exactly and evaluates through the same engine;
TransReID's recipe (defaults, schedule, parameter groups, loss) against upstream's formulas."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import fit_interrupted_in_epoch, torchrun_two
from transmatcher_fast.cli import build_parser, main
from transmatcher_fast.engine.evaluate import eval_transform, evaluate, load_trained
from transmatcher_fast.engine.trainer import Trainer, TrainConfig
from transmatcher_fast.methods import METHOD_DEFAULTED, get_method, method_names
from transmatcher_fast.methods.losses import TransReIDLoss, soft_margin_triplet
from transmatcher_fast.methods.schedules import WarmupCosineSchedule, build_schedule

COMMON = ["-d", "market", "--height", "64", "--width", "32", "-b", "16", "--num-instances", "4",
          "-j", "0", "--no-progress", "--no-tensorboard", "--log-every", "1"]
# A tiny model of each method: 64 x 32 images; the ViT's stride-16 grid is 4 x 2 = 8 patches.
TINY = {
    "transmatcher": ["--method", "transmatcher", "-a", "resnet18", "--ibn", "none", "--neck", "16",
                     "--num-trans-layers", "2", "--dim-feedforward", "32", "--no-freeze-bn"],
    "qaconv": ["--method", "qaconv", "-a", "resnet18", "--ibn", "none", "--neck", "16",
               "--loss", "triplet", "--no-freeze-bn"],
    "transreid": ["--method", "transreid", "-a", "vit_tiny_patch16", "--jpm", "--sie-camera",
                  "--divide-length", "2", "--drop-path", "0.1", "--lr", "0.01", "--warmup-epochs", "1"],
    "vit_tokens": ["--method", "transmatcher", "-a", "vit_tiny_patch16", "--num-trans-layers", "2",
                   "--dim-feedforward", "32", "--sie-camera", "--sampler", "pk"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSMATCHER_FAST_BACKEND": "cpu"}
ENV.pop("TRITON_INTERPRET", None)


def tiny_config(kind, data_dir, exp_dir, *extra) -> TrainConfig:
    args = build_parser().parse_args(["train", *COMMON, *TINY[kind], "--data-dir", str(data_dir),
                                      "--exp-dir", str(exp_dir), *extra])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    return TrainConfig.from_dict(values)


def step_losses(exp_dir, epoch=None):
    lines = (Path(exp_dir) / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines)
            if r["kind"] == "step" and (epoch is None or r["epoch"] == epoch)]


# --- the seam --------------------------------------------------------------------------------

def test_every_method_gives_every_method_default_and_the_config_resolves_them():
    assert {"transmatcher", "qaconv", "transreid"} <= set(method_names())
    for name in method_names():
        config = TrainConfig(method=name)
        for option in METHOD_DEFAULTED:
            assert getattr(config, option) == get_method(name).defaults[option], (name, option)
    reid = TrainConfig(method="transreid")
    assert (reid.arch, reid.height, reid.width, reid.lr, reid.weight_decay, reid.epochs, reid.sampler,
            reid.loss, reid.schedule, reid.clip_value, reid.freeze_bn) == (
        "vit_base_patch16", 256, 128, 0.008, 1e-4, 120, "pk_all", "softmax_triplet", "cosine", 0.0, False)
    assert TrainConfig(method="transreid", lr=0.02).lr == 0.02  # a given value wins
    with pytest.raises(ValueError, match="loss 'pairwise' is not a loss of method 'transreid'"):
        TrainConfig(method="transreid", loss="pairwise")
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="resnet")


def test_legacy_matcher_option_is_the_method(tmp_path):
    assert TrainConfig.from_dict({"matcher": "qaconv"}).method == "qaconv"
    args = build_parser().parse_args(["train", "--matcher", "qaconv"])
    assert args.method == "qaconv"


def test_train_help_shows_each_methods_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    lr = text[text.index("base learning rate (default:"):].split(")")[0]
    assert "qaconv/transmatcher 0.005" in lr and "transreid 0.008" in lr
    sampler = text[text.index("(TransReID) (default:"):].split(")")[1]
    assert "qaconv/transmatcher graph" in sampler and "transreid pk_all" in sampler
    assert "(default: the method's)" not in text


@pytest.mark.parametrize("kind", sorted(TINY))
def test_every_method_resumes_its_next_epoch_exactly(kind, data_dir, tmp_path):
    """Two epochs in one go, and two epochs interrupted after the first + --resume: the second
    epoch's step losses and the final weights of every part are identical."""
    extra = ("--epochs", "2", "--max-steps-per-epoch", "2")
    full = Trainer(tiny_config(kind, data_dir, tmp_path / "full", *extra))
    full.fit()
    fit_interrupted_in_epoch(Trainer(tiny_config(kind, data_dir, tmp_path / "split", *extra)), 1)
    resumed = Trainer(tiny_config(kind, data_dir, tmp_path / "split", "--resume", *extra))
    resumed.fit()
    assert step_losses(tmp_path / "split", 1) == step_losses(tmp_path / "full", 1)
    assert all(math.isfinite(x) for x in step_losses(tmp_path / "full"))
    for name, part in full.parts.items():
        for (key, a), b in zip(part.state_dict().items(), resumed.parts[name].state_dict().values()):
            assert torch.equal(a, b), (kind, name, key)
    # The checkpoint rebuilds the model without the data, and evaluates like the trained one.
    model, matcher, config = load_trained(tmp_path / "full" / "checkpoint.pt")
    assert config["method"] == TINY[kind][1]
    dataset = full.dataset
    transform = eval_transform(config, 64, 32)
    kwargs = dict(height=64, width=32, batch_size=8, workers=0, progress=False, transform=transform)
    ours = evaluate(full.model, full.matcher, dataset.query, dataset.gallery, **kwargs).metrics
    loaded = evaluate(model, matcher, dataset.query, dataset.gallery, **kwargs).metrics
    assert ours["mAP"] == pytest.approx(loaded["mAP"]) and 0 < ours["mAP"] <= 1


def test_transreid_eval_through_the_cli_and_eval_during_training(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *COMMON, *TINY["transreid"], "--data-dir", str(data_dir), "--exp-dir", str(run),
                 "--epochs", "2", "--max-steps-per-epoch", "2", "--eval-every", "1"]) == 0
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert len(evals) == 2 and (run / "best.pt").is_file()
    assert evals[0]["provenance"]["method"] == "transreid"
    assert evals[0]["provenance"]["model"]["jpm"] is True
    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "-d", "market", "--data-dir",
                 str(data_dir), "-j", "0", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["mAP"] <= 1
    assert result["provenance"]["protocol"]["distance"].startswith("squared Euclidean")
    pictures = tmp_path / "pictures"
    assert main(["visualize", "--checkpoint", str(run / "checkpoint.pt"), "-d", "market", "--data-dir",
                 str(data_dir), "-j", "0", "--no-progress", "--num-queries", "2", "--out", str(pictures),
                 "--log", str(run / "log.jsonl"), "--attention-keep", "0.6"]) == 0
    attention = sorted((pictures / "attention").glob("attention_q*_pid*.png"))
    ranked = sorted((pictures / "ranked_lists").glob("ranked_q*_pid*.png"))
    assert len(attention) == len(ranked) == 2
    assert [p.name.split("_pid")[0][len("attention_"):] for p in attention] == \
        [p.name.split("_pid")[0][len("ranked_"):] for p in ranked]  # the same queries
    assert not (pictures / "correspondences").exists()  # embeddings: no location matches
    from PIL import Image
    # image, rollout, 3 heads, JPM groups: six panels side by side
    assert Image.open(attention[0]).width >= 6 * 128


def test_keep_mass_is_the_smallest_set_with_the_fraction():
    from transmatcher_fast.engine.attention_pictures import keep_mass

    a = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]).numpy()
    assert keep_mass(a, 0.6).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert keep_mass(a, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        keep_mass(a, 0.0)


def test_transreid_trains_in_sync_under_torchrun(data_dir, tmp_path):
    out = tmp_path / "ddp.json"
    result = torchrun_two(Path(__file__).with_name("ddp_train_worker.py"), *COMMON, *TINY["transreid"], "-b", "8",
                          "--data-dir", data_dir, "--exp-dir", tmp_path / "run", "--epochs", "1",
                          "--max-steps-per-epoch", "2", out, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["steps"] == 2  # 4 batches of 2 ids x 4 images
    rank0, rank1 = report["checksums"]
    assert rank0 == rank1


# --- TransReID's recipe ----------------------------------------------------------------------

def test_cosine_schedule_matches_upstreams_epoch_rates():
    """Reference §3.2: lr0 = 0.008, 5 warm-up epochs from 1 %, cosine to 0.2 % over 120 epochs,
    stepped with the 1-based epoch; a bias group peaks at 2 lr0 from the same start and end."""
    config = TrainConfig(method="transreid")
    schedule = build_schedule(config)
    assert isinstance(schedule, WarmupCosineSchedule) and schedule.end == 120
    lr0, w, lr_min = 0.008, 0.008 * 0.01, 0.008 * 0.002
    listed = {1: 1.66e-3, 2: 3.25e-3, 3: 4.83e-3, 4: 6.42e-3, 5: 7.97e-3, 30: 6.83e-3, 60: 4.01e-3,
              90: 1.19e-3, 120: 1.6e-5}
    for one_based, value in listed.items():
        assert schedule.lr(one_based - 1, lr0) == pytest.approx(value, rel=6e-3), one_based
    for e in range(120):
        t = e + 1
        expected = (w + t * (lr0 - w) / 5 if t < 5 else
                    lr_min + 0.5 * (lr0 - lr_min) * (1 + math.cos(math.pi * t / 120)) if t < 120 else lr_min)
        assert schedule.lr(e, lr0) == pytest.approx(expected, rel=1e-12)
    assert schedule.lr(0, 2 * lr0) == pytest.approx(w + (2 * lr0 - w) / 5)  # bias: same start
    assert schedule.lr(119, 2 * lr0) == pytest.approx(lr_min)
    ssl = build_schedule(TrainConfig(method="transreid", lr=4e-4, warmup_epochs=20, schedule_offset=0))
    assert ssl.lr(0, 4e-4) == pytest.approx(4e-6)  # SSL steps at the epoch's end: epoch 1 at lr(0)


def test_transreid_parameter_groups_and_optimizer():
    method = get_method("transreid")
    config = TrainConfig(method="transreid", arch="vit_tiny_patch16", height=64, width=32, jpm=True)
    parts = method.build(config, {"num_classes": 5, "camera_num": 2, "view_num": 1})
    groups = method.param_groups(parts, config)
    assert [g["name"] for g in groups] == ["weights", "biases"]
    assert groups[0]["lr"] == 0.008 and groups[1]["lr"] == 0.016
    names = {id(p): n for n, p in parts["model"].named_parameters()}
    assert all("bias" in names[id(p)] for p in groups[1]["params"])
    assert all("bias" not in names[id(p)] for p in groups[0]["params"])
    # The backbone's own last block and LN are unused under JPM (b1 / b2 are their copies).
    unused = {n for n, p in parts["model"].named_parameters() if not p.requires_grad}
    assert unused and all(n.startswith(("base.blocks.3.", "base.norm.", "base.fc.")) or
                          (n.startswith("bottleneck") and n.endswith(".bias")) for n in unused)
    assert any(n.startswith("base.blocks.3.") for n in unused)
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = method.optimizer(groups, config)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 and not g["nesterov"]
               for g in optimizer.param_groups)


def _hand_triplet(x, y):
    """Soft-margin batch-hard triplet, by loops, in float64."""
    x = x.double()
    total, count = 0.0, 0
    for a in range(len(x)):
        d = [math.sqrt(max(float((x[a] * x[a]).sum() + (x[b] * x[b]).sum() - 2 * (x[a] * x[b]).sum()), 1e-12))
             for b in range(len(x))]
        pos = max(d[b] for b in range(len(x)) if y[b] == y[a])
        neg = min(d[b] for b in range(len(x)) if y[b] != y[a])
        total += math.log1p(math.exp(pos - neg))
        count += 1
    return total / count


def test_transreid_loss_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    feats = [torch.randn(6, 8, generator=g) for _ in range(3)]
    scores = [torch.randn(6, 4, generator=g) for _ in range(3)]
    assert soft_margin_triplet(feats[0], y).item() == pytest.approx(_hand_triplet(feats[0], y), rel=1e-5)

    def ce(s):
        return sum(-torch.log_softmax(s.double(), 1)[i, y[i]].item() for i in range(6)) / 6

    loss, acc = TransReIDLoss()(scores[0], feats[0], y)
    assert loss.item() == pytest.approx(ce(scores[0]) + _hand_triplet(feats[0], y), rel=1e-5)
    assert acc.item() == pytest.approx((scores[0].argmax(1) == y).float().mean().item())
    jpm, _ = TransReIDLoss()(scores, feats, y)
    expected = (0.5 * ce(scores[0]) + 0.5 * (ce(scores[1]) + ce(scores[2])) / 2
                + 0.5 * _hand_triplet(feats[0], y) + 0.5 * (_hand_triplet(feats[1], y) + _hand_triplet(feats[2], y)) / 2)
    assert jpm.item() == pytest.approx(expected, rel=1e-5)


def test_triplet_distances_are_float32_under_autocast():
    """768-d features of norm ~20: bf16 distances would cancel; ours equal the fp64 value."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 768, generator=g) * 0.7 + 0.3).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = soft_margin_triplet(x * 1.0, y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_hand_triplet(x.detach(), y), rel=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_shipped_transreid_configs_parse(monkeypatch):
    configs = Path(__file__).resolve().parents[1] / "configs"
    from test_engine_trainer import _config_through_cli
    import transmatcher_fast.cli as cli

    expected = {"transreid_baseline": (16, False, False), "transreid_jpm": (16, False, True),
                "transreid_sie": (16, True, False), "transreid": (16, True, True),
                "transreid_stride": (12, True, True)}
    for name, (stride, sie, jpm) in expected.items():
        config = _config_through_cli(monkeypatch, cli, configs / f"{name}.yaml")
        assert (config.method, config.stride, config.sie_camera, config.jpm) == ("transreid", stride, sie, jpm)
        assert (config.lr, config.epochs, config.batch_size, config.seed) == (0.008, 120, 64, 1234)
        assert config == TrainConfig(method="transreid", stride=stride, sie_camera=sie, jpm=jpm, workers=8,
                                     test_batch=256, seed=1234)
    small = _config_through_cli(monkeypatch, cli, configs / "transreid_cpu_small.yaml")
    assert (small.arch, small.height, small.width, small.device) == ("vit_tiny_patch16", 128, 64, "cpu")


def test_transreid_demo_runs_end_to_end_with_attention_pictures(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "transreid", "--out", str(out), "--ids", "8", "--cams", "2",
                 "--images-per-cam", "3", "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2",
                 "-j", "0", "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["config"]["method"] == "transreid" and 0 < summary["after"]["mAP"] <= 1
    assert summary["after"]["provenance"]["protocol"]["distance"].startswith("squared Euclidean")
    assert len(list((out / "attention").glob("attention_q*_pid*.png"))) == 4  # four identities
    assert list((out / "ranked_lists").glob("ranked_q*_pid*.png"))
    assert not (out / "correspondences").exists()
    config = json.loads(json.dumps(load_trained(out / "train" / "checkpoint.pt")[2]))
    assert (config["arch"], config["jpm"], config["sie_camera"]) == ("vit_tiny_patch16", True, True)


def test_vehicleid_protocol_averages_ten_random_galleries_through_eval(data_dir, tmp_path):
    """A fake VehicleID tree (images copied from the synthetic set): `eval` evaluates the 10
    seeded query/gallery draws and reports their mean."""
    import shutil

    from transmatcher_fast.engine.evaluate import average_metrics

    run = tmp_path / "run"
    assert main(["train", *COMMON, *TINY["transreid"], "--data-dir", str(data_dir), "--exp-dir", str(run),
                 "--epochs", "1", "--max-steps-per-epoch", "1"]) == 0
    root = tmp_path / "VehicleID_V1.0"
    (root / "image").mkdir(parents=True)
    (root / "train_test_split").mkdir()
    sources = sorted((data_dir / "bounding_box_test").glob("*.jpg"))[:24]
    lines = []
    for n, path in enumerate(sources):
        name = f"{n:07d}"
        shutil.copy(path, root / "image" / f"{name}.jpg")
        lines.append(f"{name} {100 + n // 4}")  # 6 vehicles x 4 images
    (root / "train_test_split" / "train_list.txt").write_text("\n".join(lines[:8]) + "\n")
    (root / "train_test_split" / "test_list_800.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "vehicleid.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "-d", "vehicleid", "--data-dir",
                 str(tmp_path), "-j", "0", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["test_splits"] == 10 and len(result["per_split"]) == 10
    assert result["mAP"] == pytest.approx(sum(r["mAP"] for r in result["per_split"]) / 10)
    mean = average_metrics([{"mAP": 0.2, "cmc": [0.1, 0.3], "name": "a"}, {"mAP": 0.4, "cmc": [0.3, 0.5], "name": "b"}])
    assert mean["mAP"] == pytest.approx(0.3) and mean["cmc"] == pytest.approx([0.2, 0.4]) and mean["name"] == "b"


def test_train_config_refuses_a_pretrain_only_option_that_would_be_ignored(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: transreid\ndino_out_dim: 1024\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(config)])
    assert "['dino_out_dim'] are not options of train" in str(exit_info.value)


def test_transreid_evaluates_in_float32_as_upstream():
    from transmatcher_fast.engine.evaluate import default_eval_amp

    assert default_eval_amp({"method": "transreid"}) == "none"  # upstream's do_inference: fp32
    assert default_eval_amp({"method": "transmatcher"}) is None  # the engine's: bf16 on CUDA


def test_bad_transreid_arch_and_compare_checkpoint_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="arch 'resnet50' is not a ViT"):
        TrainConfig(method="transreid", arch="resnet50")
    out = tmp_path / "pictures"
    with pytest.raises(SystemExit, match="--compare-checkpoint .* give --checkpoint"):
        main(["visualize", "--compare-checkpoint", str(tmp_path / "x.pt"), "--log", str(tmp_path / "log.jsonl"),
              "--out", str(out)])
    assert not out.exists()
