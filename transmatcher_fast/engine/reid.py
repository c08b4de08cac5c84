"""``ReID``: a trained checkpoint as a Python object that ranks your own images.

    import transmatcher_fast as tmf
    reid = tmf.ReID.load("runs/market/checkpoint.pt", device="cpu")
    ranking = reid.rank(["me.jpg"], "photos/", topk=5, index="photos.index")
    ranking.paths[0], ranking.distances[0]      # the 5 nearest images of photos/ and distances

Images are files (or folders of them), PIL images, or a tensor batch as the model takes it
(``[N, 3, H, W]`` after the model's evaluation transform: resized and normalised). Every method
works the same way: the checkpoint's method rebuilds its feature model and its comparer (a fused
matcher or embedding distances), and this class only asks them for features and distances.
A gallery folder is ranked through a :class:`~.search.GalleryIndex` (stored features, only new or
changed images extracted; a temporary one without ``index``) shard by shard, in bounded memory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.images import find_unreadable
from ..data.multicrop import list_images
from ..weights_io import file_sha256
from . import evaluate
from .features import Features, extract_features, parse_dtype, skipped_summary
from .search import GalleryIndex, IndexUpdate, Ranking, shard_images, stream_topk
from .validate import UserError

PathLike = Union[str, os.PathLike]
Images = Union[PathLike, Image.Image, Tensor, Features, Sequence[Union[PathLike, Image.Image]]]


def image_files(sources: Union[PathLike, Sequence[PathLike]], what: str = "images") -> List[str]:
    """Image files of ``sources``: files as given, folders expanded to their images (recursively,
    sorted). A missing path or a folder without images raises a :class:`UserError` naming it."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise UserError(f"{what}: no image given")
    files: List[str] = []
    for source in sources:
        source = str(source)
        if os.path.isdir(source):
            try:
                files += list_images(source, IMAGE_EXTENSIONS)
            except FileNotFoundError:
                raise UserError(f"{what} {source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it "
                                "or below it") from None
        elif os.path.isfile(source):
            files.append(source)
        else:
            raise UserError(f"{what} {source}: no such file or folder")
    return files


class _InMemory(Dataset):
    """PIL images (transformed here) or model-ready tensors as extraction items."""

    def __init__(self, images: Sequence[Any], transform=None):
        self.images, self.transform = list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image.convert("RGB"))
        return image, 0, 0, index


class ReID:
    """A trained model that extracts features of images and ranks galleries for queries.

    Build it with :meth:`load`. ``model`` (images -> features) and ``matcher`` (features ->
    distances) are the checkpoint's parts in eval mode; ``height`` x ``width`` the input size;
    ``transform`` the method's evaluation transform (PIL image -> tensor)."""

    def __init__(self, model, matcher, config: Dict[str, Any], *, checkpoint: Optional[PathLike] = None,
                 device: Union[str, torch.device] = "cpu", height: Optional[int] = None,
                 width: Optional[int] = None, amp: Optional[str] = "auto", batch_size: int = 64,
                 workers: int = 0, progress: bool = False):
        self.model, self.matcher, self.config = model, matcher, dict(config)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.device = torch.device(device)
        self.height = int(height or config["height"])
        self.width = int(width or config["width"])
        self.amp = evaluate.default_eval_amp(self.config) if amp == "auto" else amp
        self.batch_size, self.workers, self.progress = int(batch_size), int(workers), bool(progress)
        self.transform = evaluate.eval_transform(self.config, self.height, self.width)
        self._fingerprint: Optional[str] = None
        self._bytes_per_image: Optional[int] = None

    @classmethod
    def load(cls, checkpoint: PathLike, device: Union[str, torch.device, None] = None, **options: Any) -> "ReID":
        """The model and comparer of ``checkpoint`` (of ``transmatcher-fast train`` or
        upstream's TransMatcher / QAConv ``checkpoint.pth.tar``) on ``device`` (default: cuda if
        available, else cpu). ``options``: ``height``, ``width`` (default: the checkpoint's),
        ``amp`` ("auto": the method's choice), ``batch_size``, ``workers`` (loader processes),
        ``progress`` (bars). A file that is not a checkpoint raises a one-line
        :class:`UserError`."""
        from . import validate

        device = validate.check_device(None if device is None else str(device), "device")
        state = validate.read_checkpoint(checkpoint, "checkpoint")
        validate.check_input_size(state, options.get("height"), options.get("width"), checkpoint)
        del state
        model, matcher, config = evaluate.load_trained(checkpoint, device)
        return cls(model, matcher, config, checkpoint=checkpoint, device=device, **options)

    # --- features ------------------------------------------------------------------------
    @property
    def distance_name(self) -> str:
        """What the distances are (lower = closer), as results record it."""
        from .export import DISTANCE

        return getattr(self.matcher, "distance_name", DISTANCE)

    def extract(self, images: Images, *, skip_bad_images: bool = False, desc: str = "features") -> Features:
        """Features of ``images``: a file or folder path, a list of paths (folders expanded), a
        PIL image or a list of them, or a float tensor ``[N, 3, H, W]`` / ``[3, H, W]`` already
        transformed as the model expects (``reid.transform``); :class:`Features` pass through.
        ``Features.paths`` holds the files when they were files. An unreadable file raises an
        error naming it, or with ``skip_bad_images`` is left out (``Features.skipped``)."""
        if isinstance(images, Features):
            return images
        if isinstance(images, Tensor):
            return self._extract_loader(_InMemory(self._check_batch(images)), desc)
        if isinstance(images, Image.Image):
            images = [images]
        if (not isinstance(images, (str, os.PathLike)) and len(images)
                and all(isinstance(image, Image.Image) for image in images)):
            return self._extract_loader(_InMemory(images, self.transform), desc)
        files = image_files(images)
        return evaluate.extract(self.model, [(path, 0, 0) for path in files], height=self.height,
                                width=self.width, batch_size=self.batch_size, workers=self.workers,
                                device=self.device, amp=self.amp, progress=self.progress, desc=desc,
                                skip_bad_images=skip_bad_images, transform=self.transform)

    def _check_batch(self, images: Tensor) -> Tensor:
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        expected = f"[N, 3, {self.height}, {self.width}]"
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"images: a tensor must be a batch {expected} (transformed as the "
                             f"model expects), got {tuple(images.shape)}")
        if not batch.is_floating_point():
            raise ValueError(f"images: a tensor must be floating point (the model's input), got {batch.dtype}")
        return batch

    def _extract_loader(self, dataset: Dataset, desc: str) -> Features:
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)
        return extract_features(self.model, loader, device=self.device, amp=self.amp,
                                progress=self.progress, desc=desc, storage_device="cpu")

    def bytes_per_image(self) -> int:
        """Bytes of one image's stored features (what the shard size of an index follows)."""
        if self._bytes_per_image is None:
            one = self.extract(torch.zeros(1, 3, self.height, self.width), desc="feature size").features
            self._bytes_per_image = one[0].numel() * one.element_size()
        return self._bytes_per_image

    # --- gallery index -------------------------------------------------------------------
    def model_key(self) -> Dict[str, Any]:
        """What the stored features of an index depend on: the checkpoint's bytes, the input
        size and the autocast."""
        if self._fingerprint is None:
            self._fingerprint = file_sha256(self.checkpoint) if self.checkpoint else self._weights_sha256()
        # "auto" extracts in bfloat16 on CUDA and float32 on the CPU: key on what actually runs.
        amp = parse_dtype(self.amp, "amp") if self.amp is not None else (
            torch.bfloat16 if torch.device(self.device).type == "cuda" else None)
        return {"checkpoint_sha256": self._fingerprint, "height": self.height, "width": self.width,
                "amp": None if amp is None else str(amp)}

    def _weights_sha256(self) -> str:
        """A model given without its checkpoint file: the SHA-256 of its weights (names and
        bytes), so that two models never share an index."""
        digest = hashlib.sha256()
        for part in (self.model, self.matcher):
            for name, tensor in part.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "weights " + digest.hexdigest()

    def index(self, gallery: Union[PathLike, Sequence[PathLike]], folder: PathLike, *,
              skip_bad_images: bool = False, shard_bytes: Optional[int] = None
              ) -> Tuple[GalleryIndex, IndexUpdate]:
        """The :class:`GalleryIndex` in ``folder`` of the images of ``gallery`` (folders and
        files), brought up to date: only the images that are new or changed since it was
        written are extracted. The images to extract are checked first: an unreadable one
        raises a :class:`UserError` naming it, or with ``skip_bad_images`` is left out."""
        return self._update(*self._checked_index(gallery, folder, skip_bad_images), shard_bytes)

    def _checked_index(self, gallery, folder, skip_bad_images: bool):
        """The index in ``folder``, the gallery's files and the unreadable ones among them (those
        recorded so and the new or changed ones, decoded once here): an error naming the first
        unless ``skip_bad_images``."""
        files = image_files(gallery, "gallery")
        index = GalleryIndex(folder, self.model_key())
        todo = index.changed(files)
        pending = set(todo)
        bad = index.unreadable([p for p in files if p not in pending])
        bad += find_unreadable(todo, workers=self.workers, progress=self.progress) if todo else []
        if bad and not skip_bad_images:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UserError(f"gallery: {bad[0][1]}{more}; fix or remove it, or pass --skip-bad-images")
        if len(bad) == len(files):
            raise UserError(f"gallery: none of its {len(files)} images can be read")
        return index, files, bad

    def _update(self, index: GalleryIndex, files: List[str], bad, shard_bytes: Optional[int] = None
                ) -> Tuple[GalleryIndex, IndexUpdate]:
        from .search import SHARD_BYTES

        update = index.update(files, lambda paths: self.extract(paths, skip_bad_images=True, desc="gallery"),
                              per_shard=lambda: shard_images(self.bytes_per_image(), shard_bytes or SHARD_BYTES),
                              skipped=bad)
        if update.skipped:
            print(f"gallery: {skipped_summary(update.skipped)}", file=sys.stderr, flush=True)
        return index, update

    # --- ranking -------------------------------------------------------------------------
    def rank(self, query: Images, gallery: Images, topk: int = 10, *, index: Optional[PathLike] = None,
             skip_bad_images: bool = False, probe_chunk: Optional[int] = None,
             gallery_chunk: Optional[int] = None) -> Ranking:
        """The ``topk`` nearest gallery images of each query (``topk`` is clamped to the gallery
        size; ``ranking.topk`` says what was used), nearest first.

        ``query`` / ``gallery``: images as :meth:`extract` takes them, or features it returned.
        A gallery given as a folder (or a list of paths) is ranked through a gallery index:
        in ``index`` (kept for the next call: only new or changed images are extracted then),
        else in a temporary folder; one shard of features is in memory at a time."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive integer, got {topk!r}")
        options = dict(device=self.device, amp=self.amp, probe_chunk=probe_chunk, gallery_chunk=gallery_chunk)
        if index is not None and not _is_files(gallery):
            raise ValueError("index: only a gallery of files or folders is indexed (give its paths)")
        if _is_files(gallery):
            if index is not None:
                return self._rank_indexed(query, gallery, index, topk, skip_bad_images, options)
            with tempfile.TemporaryDirectory(prefix="transmatcher-fast-index-") as folder:
                return self._rank_indexed(query, gallery, folder, topk, skip_bad_images, options)
        q = self.extract(query, skip_bad_images=skip_bad_images, desc="query")
        g = self.extract(gallery, skip_bad_images=skip_bad_images, desc="gallery")
        if q.features.shape[1:] != g.features.shape[1:]:
            raise ValueError(f"query features {tuple(q.features.shape[1:])} and gallery features "
                             f"{tuple(g.features.shape[1:])} differ in shape (from different models?)")
        best = stream_topk(self.matcher, q.features, [(g.features, torch.arange(len(g)))],
                           min(topk, len(g)), **options)
        return Ranking(best.index, best.dist, q.paths, g.paths, self.distance_name)

    def _rank_indexed(self, query: Images, gallery, folder, topk: int, skip_bad_images: bool,
                      options: Dict[str, Any]) -> Ranking:
        # The gallery's files are checked first, the queries extracted, then the gallery.
        checked = self._checked_index(gallery, folder, skip_bad_images)
        q = self.extract(query, skip_bad_images=skip_bad_images, desc="query")
        index, update = self._update(*checked)
        best = stream_topk(self.matcher, q.features, index.shards(), min(topk, len(index)), **options)
        return Ranking(best.index, best.dist, q.paths, list(index.paths), self.distance_name,
                       index_update=update)


def _is_files(images: Any) -> bool:
    """Whether ``images`` names files or folders (a path, or a list of paths)."""
    if isinstance(images, (str, os.PathLike)):
        return True
    return (isinstance(images, (list, tuple)) and len(images) > 0
            and all(isinstance(i, (str, os.PathLike)) for i in images))
