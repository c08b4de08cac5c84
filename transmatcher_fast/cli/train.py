"""``train``: a method with its upstream recipe; also the training entry that ``pretrain``
shares (checks, the Trainer's run, Ctrl-C with where to continue)."""

from __future__ import annotations

import argparse
import sys

from .common import _NOT_OPTIONS, PROG, _optional_int, _optional_str, _positive_int


def train_entry(args: argparse.Namespace, command: str, check=None, finished=None) -> int:
    """The one training entry of ``train`` and ``pretrain``: the options into a TrainConfig, the
    paths checked (``check(config)``: the command's own), the Trainer's run, Ctrl-C answered with
    where to continue; ``finished(trainer, config)`` runs after a complete fit."""
    from ..engine.trainer import Trainer, TrainConfig

    values = {key: value for key, value in vars(args).items() if key not in _NOT_OPTIONS}
    config = TrainConfig.from_dict(values)  # a bad value: ValueError, one line (see main)
    _check_train_paths(config)
    if check is not None:
        check(config)
    try:
        trainer = Trainer(config)  # RunDirError: the folder is in use or holds a run
        trainer.fit()
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} {command}: interrupted; {_last_checkpoint(config.exp_dir)}", file=sys.stderr)
        raise SystemExit(130) from None
    if finished is not None:
        finished(trainer, config)
    trainer.close()
    return 0


def run_train(args: argparse.Namespace) -> int:
    return train_entry(args, "train")


def _last_checkpoint(exp_dir) -> str:
    """What a run interrupted in ``exp_dir`` can continue from, for the console."""
    from pathlib import Path

    from ..engine.rundir import CHECKPOINT_NAME
    from ..weights_io import load

    path = Path(exp_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return "no checkpoint written yet"
    try:  # mmap: only the small values are read, not every tensor
        epoch = load(path, mmap=True)["epoch"]
    except Exception:
        return f"{path} cannot be read"
    return f"last complete checkpoint: {path} (epoch {epoch}); continue with --resume"


def _check_train_paths(config) -> None:
    """What train reads and writes, before the Trainer builds anything."""
    from ..engine import validate

    validate.check_device(config.device)
    validate.check_data_dir(config.data_dir, config.dataset)
    validate.check_output_dir(config.exp_dir, "--exp-dir")
    if config.pretrained is not None:
        validate.check_input_file(config.pretrained, "--pretrained")
    if config.workers < 0:
        raise validate.UserError(f"-j/--workers {config.workers}: must be 0 (load in the main process) or more")


def _method_default(name: str) -> str:
    """Each method's default of option ``name``, for --help: "default: transmatcher 0.005, ..."."""
    from ..methods import get_method, method_names

    values = {}
    for method in method_names():
        values.setdefault(str(get_method(method).defaults[name]), []).append(method)
    return "default: " + ", ".join(f"{'/'.join(ms)} {v}" for v, ms in values.items())


def add_train_parser(commands) -> argparse.ArgumentParser:
    from ..engine.trainer import AMP_CHOICES, FROM_METHOD, LOSSES, NECK_FEATS, SAMPLERS, SCHEDULES, TrainConfig

    d = TrainConfig()

    def by_method(name: str, text: str = "") -> dict:
        """The default and help of an option whose default is the method's."""
        return {"default": FROM_METHOD, "help": f"{text} ({_method_default(name)})".strip()}

    def non_negative_int(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
        return value

    train = commands.add_parser(
        "train", help="train a TransMatcher / QAConv / TransReID model (upstream's recipe)",
        description="Train a method with its upstream recipe (the options marked 'default: "
                    "<method> <value>' take the method's value unless given): transmatcher / qaconv: "
                    "graph sampler, pairwise matching loss, SGD Nesterov, AMP, gradient clipping; "
                    "transreid: P x K sampler, cross-entropy + soft-margin triplet, SGD, warm-up + "
                    "cosine, AMP. A checkpoint is written atomically after every "
                    "epoch to EXP_DIR/checkpoint.pt; --resume continues a killed run. Logs: "
                    "EXP_DIR/log.jsonl and EXP_DIR/tensorboard. A run locks EXP_DIR (EXP_DIR/train.lock "
                    "holds its pid): a second run there fails at once, and a fresh start refuses a "
                    "folder that holds a run unless --overwrite is given. EXP_DIR/config.yaml records "
                    "the resolved options (--config reads it back); --resume may change only epochs, "
                    "max-epochs, max-steps-per-epoch, workers, logging, progress, tensorboard, "
                    "eval-every, the test batch/chunk sizes, device and the data/exp folders (the "
                    "changes are logged), and refuses other differences. Multi-GPU: torchrun "
                    "--nproc_per_node N -m transmatcher_fast.cli train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="YAML file of options (keys as below, e.g. batch_size: 32); "
                       "command-line flags override it")
    data = train.add_argument_group("data")
    data.add_argument("-d", "--dataset", default=d.dataset, help="dataset name (see the registry)")
    data.add_argument("--data-dir", default=d.data_dir,
                      help="folder of the dataset, or its parent holding a folder named like --dataset")
    data.add_argument("--height", type=_positive_int, **by_method("height", "input height"))
    data.add_argument("--width", type=_positive_int, **by_method("width", "input width"))
    data.add_argument("-j", "--workers", type=int, default=d.workers, help="data loader workers")
    data.add_argument("--skip-bad-images", dest="skip_bad_images", action=argparse.BooleanOptionalAction,
                      default=d.skip_bad_images,
                      help="decode every training image first and leave the unreadable ones out "
                           "(listed once, and in EXP_DIR/log.jsonl) instead of stopping at the first")
    model = train.add_argument_group("model")
    model.add_argument("--method", "--matcher", dest="method", default=d.method,
                       help="transmatcher, qaconv (fused matchers of feature maps) or transreid (ViT "
                            "embeddings)")
    model.add_argument("-a", "--arch", **by_method("arch", "resnet18/34/50/101/152 or a ViT (vit_base_patch16, "
                       "vit_small_patch16, deit_small_patch16, ...; a ViT feeds the matchers its token map)"))
    model.add_argument("--ibn", type=_optional_str, **by_method("ibn", "'b' (IBN-Net-b) or none"))
    model.add_argument("--final-layer", "--final_layer", dest="final_layer", default=d.final_layer,
                       help="last backbone stage: layer2, layer3 or layer4")
    model.add_argument("--neck", type=int, default=d.neck,
                       help="neck channels = d_model (default 512 TransMatcher, 128 QAConv)")
    model.add_argument("--nhead", type=_positive_int, default=d.nhead, help="encoder heads")
    model.add_argument("--num-trans-layers", "--num_trans_layers", dest="num_trans_layers",
                       type=_positive_int, default=d.num_trans_layers,
                       help="N: N-1 encoder layers and N decoder layers")
    model.add_argument("--dim-feedforward", "--dim_feedforward", dest="dim_feedforward",
                       type=_positive_int, default=d.dim_feedforward, help="encoder FFN and decoder MLP width")
    model.add_argument("--dropout", type=float, default=d.dropout, help="encoder dropout")
    model.add_argument("--pretrained", type=_optional_str, default=d.pretrained,
                       help="local backbone weights: torchvision / IBN-Net state_dict, or an ImageNet ViT / "
                            "DeiT / DINO checkpoint (nothing is downloaded)")
    vit = train.add_argument_group("ViT and TransReID")
    vit.add_argument("--stride", type=_positive_int, default=d.stride,
                     help="patch-embedding stride (16: no overlap; 12: TransReID*)")
    vit.add_argument("--sie-camera", dest="sie_camera", action=argparse.BooleanOptionalAction,
                     default=d.sie_camera, help="side information embedding of the camera")
    vit.add_argument("--sie-view", dest="sie_view", action=argparse.BooleanOptionalAction,
                     default=d.sie_view, help="side information embedding of the viewpoint")
    vit.add_argument("--sie-coe", dest="sie_coe", type=float, default=d.sie_coe, help="SIE weight lambda")
    vit.add_argument("--jpm", action=argparse.BooleanOptionalAction, default=d.jpm,
                     help="jigsaw patch module (transreid)")
    vit.add_argument("--shift-num", dest="shift_num", type=_positive_int, default=d.shift_num,
                     help="JPM shift m (moves m-1 patches; 5 persons, 8 vehicles)")
    vit.add_argument("--shuffle-groups", dest="shuffle_groups", type=_positive_int, default=d.shuffle_groups)
    vit.add_argument("--divide-length", dest="divide_length", type=_positive_int, default=d.divide_length,
                     help="JPM local groups k")
    vit.add_argument("--rearrange", action=argparse.BooleanOptionalAction, default=d.rearrange,
                     help="JPM shift + shuffle (off: contiguous groups)")
    vit.add_argument("--drop-path", dest="drop_path", type=float, default=d.drop_path, help="stochastic depth")
    vit.add_argument("--neck-feat", dest="neck_feat", choices=NECK_FEATS, default=d.neck_feat,
                     help="test feature before or after the BNNeck")
    vit.add_argument("--stem-conv", dest="stem_conv", action=argparse.BooleanOptionalAction,
                     default=d.stem_conv, help="TransReID-SSL's IBN convolution stem (ICS)")
    vit.add_argument("--pretrain-hw-ratio", dest="pretrain_hw_ratio", type=_positive_int,
                     default=d.pretrain_hw_ratio,
                     help="height/width ratio of the pre-trained position grid (2: DINO on LUPerson)")
    vit.add_argument("--gem-pooling", dest="gem_pooling", action=argparse.BooleanOptionalAction,
                     default=d.gem_pooling, help="TransReID-SSL: cls + GeM of the patch tokens")
    batches = train.add_argument_group("batches and loss")
    batches.add_argument("--sampler", choices=SAMPLERS, **by_method(
        "sampler", "graph: upstream GS (nearest ids by the current model); pk: every id once per epoch; pk_all: every image once per epoch (TransReID)"))
    batches.add_argument("-b", "--batch-size", dest="batch_size", type=_positive_int, default=d.batch_size)
    batches.add_argument("--num-instances", "--num_instance", "--num_instances", dest="num_instances",
                         type=_positive_int, default=d.num_instances, help="images per identity in a batch")
    batches.add_argument("--loss", choices=LOSSES, **by_method(
        "loss", "pairwise: matching BCE (TransMatcher); triplet: batch-hard (QAConv 2.1); "
        "softmax_triplet: cross-entropy + soft-margin triplet (TransReID)"))
    batches.add_argument("--margin", type=float, default=d.margin, help="triplet margin (matchers)")
    batches.add_argument("--id-loss-weight", dest="id_loss_weight", type=float, default=d.id_loss_weight)
    batches.add_argument("--triplet-loss-weight", dest="triplet_loss_weight", type=float,
                         default=d.triplet_loss_weight)
    batches.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=d.label_smoothing,
                         help="cross-entropy label smoothing (TransReID's configs: off)")
    batches.add_argument("--erasing-p", dest="erasing_p", type=float, default=d.erasing_p,
                         help="TransReID's random erasing probability")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, **by_method("lr", "base learning rate"))
    optim.add_argument("--backbone-lr-factor", dest="backbone_lr_factor", type=float,
                       default=d.backbone_lr_factor, help="matchers: backbone lr = lr x this")
    optim.add_argument("--bias-lr-factor", dest="bias_lr_factor", type=float, default=d.bias_lr_factor,
                       help="transreid: bias lr = lr x this")
    optim.add_argument("--momentum", type=float, default=d.momentum,
                       help="SGD momentum (Nesterov for the matchers)")
    optim.add_argument("--weight-decay", dest="weight_decay", type=float, **by_method("weight_decay"))
    optim.add_argument("--epochs", type=_positive_int, **by_method("epochs", "epochs (step, cosine)"))
    optim.add_argument("--schedule", choices=SCHEDULES, **by_method(
        "schedule", "step: x gamma every step-size epochs; adaptive: QAConv 2.1's loss-driven decay; "
        "cosine: linear warm-up then cosine (TransReID)"))
    optim.add_argument("--step-size", "--step_size", dest="step_size", type=_positive_int, default=d.step_size)
    optim.add_argument("--gamma", type=float, default=d.gamma, help="learning-rate decay factor")
    optim.add_argument("--step-factor", dest="step_factor", type=float, default=d.step_factor,
                       help="adaptive: decay when the loss is below this x the second epoch's")
    optim.add_argument("--max-epochs", dest="max_epochs", type=_positive_int, default=d.max_epochs,
                       help="adaptive: the most epochs")
    optim.add_argument("--warmup-epochs", dest="warmup_epochs", type=_positive_int, default=d.warmup_epochs,
                       help="cosine: linear warm-up epochs")
    optim.add_argument("--warmup-factor", dest="warmup_factor", type=float, default=d.warmup_factor,
                       help="cosine: warm-up starts at lr x this")
    optim.add_argument("--lr-min-factor", dest="lr_min_factor", type=float, default=d.lr_min_factor,
                       help="cosine: ends at lr x this")
    optim.add_argument("--schedule-offset", dest="schedule_offset", type=int, default=d.schedule_offset,
                       help="cosine: epoch e runs at lr(e + offset): 1 TransReID, 0 TransReID-SSL")
    optim.add_argument("--clip-value", "--clip_value", dest="clip_value", type=float,
                       **by_method("clip_value", "gradient-norm clip of each part (0: off)"))
    optim.add_argument("--amp", choices=AMP_CHOICES, default=d.amp,
                       help="autocast: auto = fp16 + GradScaler on CUDA, none on CPU; bf16 needs no scaler")
    optim.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, **by_method(
        "freeze_bn", "keep the feature model's BatchNorm statistics frozen (upstream TransMatcher)"))
    gs = train.add_argument_group("graph sampler matching")
    gs.add_argument("--test-batch", dest="test_batch", type=_positive_int, default=d.test_batch,
                    help="feature extraction batch")
    gs.add_argument("--test-prob-batch", "--test_prob_batch", dest="test_prob_batch", type=_optional_int,
                    default=d.test_prob_batch, help="probe chunk (default 256)")
    gs.add_argument("--test-gal-batch", "--test_gal_batch", dest="test_gal_batch", type=_optional_int,
                    default=d.test_gal_batch, help="gallery chunk (default: from free memory)")
    run = train.add_argument_group("run")
    run.add_argument("--exp-dir", dest="exp_dir", default=d.exp_dir, help="checkpoint and logs folder")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", default=d.resume,
                       help="continue from EXP_DIR/checkpoint.pt; without one it starts from scratch "
                            "if EXP_DIR holds no run (no config.yaml, log.jsonl or tensorboard/ events; so one "
                            "command can start and restart a job), and refuses otherwise")
    start.add_argument("--overwrite", action="store_true", default=d.overwrite,
                       help="start afresh in an EXP_DIR that holds a run: removes its checkpoint.pt, best.pt, "
                            "config.yaml, log.jsonl and tensorboard/ event files (nothing else). Without --resume or "
                            "--overwrite, training refuses a folder that holds a run")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--device", type=_optional_str, default=d.device, help="default: cuda[:LOCAL_RANK] if available, else cpu")
    run.add_argument("--log-every", dest="log_every", type=_positive_int, default=d.log_every,
                     help="steps between step records in log.jsonl")
    run.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=_optional_int,
                     default=d.max_steps_per_epoch, help="cut every epoch short (quick runs)")
    run.add_argument("--eval-every", dest="eval_every", type=non_negative_int, default=d.eval_every,
                     help="epochs between evaluations on the dataset's query/gallery (upstream's "
                          "protocol; 'eval' records in log.jsonl and TensorBoard, best mAP kept as "
                          "EXP_DIR/best.pt); 0: none")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                     help="progress bar")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=d.tensorboard,
                     help="TensorBoard logs in EXP_DIR/tensorboard")
    train.set_defaults(run=run_train)
    return train
