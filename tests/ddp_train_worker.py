"""Run under torchrun by test_engine_trainer: trains a tiny model for a few steps on every rank,
then rank 0 writes each rank's parameter checksum (they must agree: DDP kept them in sync)."""

import json
import sys

import torch
import torch.distributed as dist

from transmatcher_fast.cli import build_parser
from transmatcher_fast.engine.trainer import Trainer, TrainConfig

argv, out = sys.argv[1:-1], sys.argv[-1]
args = build_parser().parse_args(["train"] + argv)
values = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
trainer = Trainer(TrainConfig.from_dict(values))
history = trainer.fit()
params = [p.detach().double().sum() for p in list(trainer.model.parameters()) + list(trainer.matcher.parameters())]
checksum = torch.stack(params)
gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, checksum)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"world_size": dist.get_world_size(), "checksums": [g.tolist() for g in gathered],
                   "steps": history[-1]["steps"], "loss": history[-1]["loss"]}, f)
trainer.close()  # the trainer started the process group, so it also destroys it
assert not dist.is_initialized()
