"""CFS lists (TransReID-SSL's conditional filtering): read one and keep its top.

``read_cfs_list`` reads upstream's released ``CFS_list.pkl`` (a pickled list of str) without
loading any class, so a malicious pickle cannot run code, or our ``cfs_list.txt``;
``select_top`` keeps its first N or a ratio. ``engine.cfs`` writes such lists.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]


class _Refused(pickle.UnpicklingError):
    pass


class _ListOfStrUnpickler(pickle.Unpickler):
    """Refuses every global, so no class or function can be loaded and nothing can be called:
    what remains are the built-in values the opcodes build by themselves (list, str, int, ...).
    (EXT opcodes resolve through ``find_class`` too, as the extension registry is empty.)"""

    def find_class(self, module: str, name: str):
        raise _Refused(f"it asks for {module}.{name}; a CFS list holds only a list of str, so no "
                       "class or function is loaded")

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent id; a CFS list holds only a list of str")


def read_cfs_list(path: PathLike) -> List[str]:
    """The ordered image names of a CFS list: upstream's released ``CFS_list.pkl`` (a pickled list
    of str, read without loading any class, so a malicious pickle cannot run code) or our
    ``cfs_list.txt`` (one path per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cfs: the list {path} does not exist")
    with open(path, "rb") as file:
        head = file.read(1)
        file.seek(0)
        if path.suffix.lower() in (".pkl", ".pickle") or head == b"\x80":  # 0x80: PROTO opcode
            try:
                names = _ListOfStrUnpickler(file).load()
            except _Refused as e:
                raise ValueError(f"cfs: refused to read {path}: {e}") from None
            except Exception as e:  # truncated or not a pickle at all
                raise ValueError(f"cfs: {path} is not a readable pickle ({type(e).__name__}: {e})") from None
            if not isinstance(names, list):
                raise ValueError(f"cfs: {path} holds a {type(names).__name__}, not a list of image names")
            bad = next((n for n in names if not isinstance(n, str)), None)
            if bad is not None:
                raise ValueError(f"cfs: {path} holds a list with a {type(bad).__name__} ({bad!r:.80}), "
                                 "not only str image names")
            return names
        text = file.read().decode("utf-8", "surrogateescape")
    return [line for line in text.splitlines() if line.strip()]


def _count_for_ratio(ratio: float, n: int) -> int:
    return max(1, min(n, math.floor(ratio * n + 0.5)))


def select_top(names: Sequence[str], keep: Optional[int] = None,
               keep_ratio: Optional[float] = None) -> List[str]:
    """The first ``keep`` names, or the first ``round(keep_ratio * len(names))`` (half up, at least
    one) for ``keep_ratio`` in (0, 1]: exactly one of the two. Upstream keeps 2,090,122 (50 %) or
    2,508,146 (60 %) of LUPerson's images (``--keep_num``)."""
    if (keep is None) == (keep_ratio is None):
        raise ValueError("select_top: give exactly one of keep and keep_ratio")
    names = list(names)
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 0 <= keep <= len(names):
            raise ValueError(f"select_top: keep must be an integer in [0, {len(names)}] (the list's "
                             f"length), got {keep!r}")
        return names[:int(keep)]
    try:
        ratio = float(keep_ratio)
    except (TypeError, ValueError):
        ratio = math.nan
    if not 0 < ratio <= 1:
        raise ValueError(f"select_top: keep_ratio must lie in (0, 1], got {keep_ratio!r}")
    return names[:_count_for_ratio(ratio, len(names))] if names else []
