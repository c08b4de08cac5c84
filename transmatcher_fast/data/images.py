"""Reading image files: the one place that opens them, and the one error that names a bad file.

Every loader of the package (training, pre-training, extraction, pictures) reads images through
:func:`open_image`, so a truncated, corrupt or missing file raises :class:`ImageReadError` whose
message starts with the file's path and says why, in the main process or in any DataLoader
worker. :func:`find_unreadable` checks a list of files up front (``--skip-bad-images``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# What reading a broken image file raises: PIL's truncated / unidentified-image errors and missing
# files are OSErrors; some decoders raise ValueError, SyntaxError or EOFError; huge images raise
# DecompressionBombError.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_CANNOT_READ = ": cannot read the image ("


class ImageReadError(OSError):
    """An image file that cannot be read; the message is ``'<path>: cannot read the image
    (<cause>)'`` and ``path`` holds the path.

    A DataLoader worker's exception reaches the main process re-created from a message that
    wraps the worker's whole traceback (``'Caught ImageReadError in DataLoader worker process
    0. Original Traceback ...'``); the original message is recovered from its last line, so the
    error names the file whatever the worker count."""

    def __init__(self, message: str, path: Optional[str] = None):
        message = _worker_message(str(message))
        super().__init__(message)
        self.path = path if path is not None else message.split(_CANNOT_READ, 1)[0]


def _worker_message(message: str) -> str:
    """The original message of an ImageReadError re-raised from a DataLoader worker, else
    ``message`` itself."""
    if not message.startswith(f"Caught {ImageReadError.__name__} "):
        return message
    marker = f"{ImageReadError.__module__}.{ImageReadError.__name__}: "
    _, found, rest = message.rpartition(marker)
    return rest.splitlines()[0] if found and rest.strip() else message


def open_image(path) -> Image.Image:
    """The RGB image at ``path``, fully decoded; any reading error is re-raised as an
    :class:`ImageReadError` naming the file and the cause (e.g. ``'.../0001_c1s1_000151_00.jpg:
    cannot read the image (OSError: image file is truncated ...)'``)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except IMAGE_ERRORS as e:
        raise ImageReadError(f"{path}{_CANNOT_READ}{type(e).__name__}: {e})", str(path)) from e


class _Readability(Dataset):
    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[str]:
        try:
            open_image(self.paths[index])
        except ImageReadError as error:
            return str(error)
        return None


def find_unreadable(paths: Sequence[str], workers: int = 0, progress: bool = True,
                    batch_size: int = 64) -> List[Tuple[str, str]]:
    """``(path, error)`` of every file of ``paths`` that :func:`open_image` cannot read, in the
    order of ``paths``. Each file is decoded once, in ``workers`` loader processes."""
    loader = DataLoader(_Readability(paths), batch_size=batch_size, num_workers=workers,
                        collate_fn=list)
    bad, position = [], 0
    for errors in tqdm(loader, desc="checking images", unit="batch", disable=not progress,
                       leave=False):
        bad += [(str(paths[position + i]), e) for i, e in enumerate(errors) if e is not None]
        position += len(errors)
    return bad
