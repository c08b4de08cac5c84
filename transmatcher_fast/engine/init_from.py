"""``train --init-from``: a new run that starts from the weights of a trained model.

The source is anything :func:`~.evaluate.load_trained_parts` reads: a checkpoint of
``transmatcher-fast train`` (its parts are rebuilt from the configuration saved in it) or
upstream's TransMatcher / QAConv ``checkpoint.pth.tar`` (parts ``model`` and ``matcher``).
Every part of the new run takes the source part of the same name, tensor for tensor. The one difference accepted is the identity
count: tensors whose first dimension is the new run's number of training identities and whose
other dimensions match (the classifier's weights) keep their fresh initialisation when the
source has another count. Anything else that does not fit refuses the run, naming the keys.

Only the weights come across: the optimizer, the schedule, the epoch counter and the random
streams start anew (``--resume`` is what continues a run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from torch import Tensor, nn

from .. import weights_io
from .evaluate import load_trained_parts


def _identity_sized(own: Tensor, source: Tensor, num_classes: Optional[int]) -> bool:
    """Whether ``own`` is a classifier tensor of ``num_classes`` rows that ``source`` holds for
    another identity count."""
    return (num_classes is not None and own.dim() >= 1 and source.dim() == own.dim()
            and own.shape[0] == num_classes != source.shape[0] and own.shape[1:] == source.shape[1:])


def init_parts_from(parts: Mapping[str, nn.Module], path: Union[str, Path], *,
                    num_classes: Optional[int] = None) -> List[str]:
    """Copy the weights of the trained model at ``path`` into the freshly built ``parts`` (a
    method's parts by name: ``model``, ``matcher`` and any other); ``num_classes``: the new
    run's training identities (None: the method has no classifier). Returns lines to print.
    Raises ValueError naming the keys that do not fit, before anything is copied."""
    source_parts, _ = load_trained_parts(path)
    sources: Dict[str, Dict[str, Tensor]] = {name: part.state_dict() for name, part in source_parts.items()}
    missing = [name for name in parts if name not in sources]
    if missing:
        raise ValueError(f"--init-from {path}: the checkpoint holds no part named "
                         f"{', '.join(map(repr, missing))} (its parts: {', '.join(sorted(sources))})")
    plans = {}
    notes = []
    for name, part in parts.items():
        own, source = part.state_dict(), sources[name]
        fresh = sorted(k for k in own if k in source and _identity_sized(own[k], source[k], num_classes))
        kept = {k: v for k, v in own.items() if k not in fresh}
        taken = {k: v for k, v in source.items() if k not in fresh}
        weights_io.check_fits(f"--init-from {path} ({name})", kept, taken,
                              hint="a model of another architecture or options")
        plans[name] = taken
        if fresh:
            rows = source[fresh[0]].shape[0]
            notes.append(f"--init-from: a new classifier for {num_classes} identities (the "
                         f"checkpoint's has {rows}): {', '.join(f'{name}.{k}' for k in fresh)} start fresh")
    for name, taken in plans.items():
        parts[name].load_state_dict(taken, strict=False)
    notes.insert(0, f"--init-from: the weights of {path} (optimizer, schedule and epochs start anew)")
    return notes
