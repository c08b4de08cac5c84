"""Free memory on a device, and gallery chunk sizes that fit in it."""

from __future__ import annotations

from typing import Optional

import torch

# Share of the free memory one chunk's temporaries may take: the rest stays for the caller
# (features, the score matrix) and for allocator fragmentation.
FREE_MEMORY_SHARE = 0.25
_FALLBACK_FREE_BYTES = 1 << 30  # where free memory cannot be read


def free_bytes(device: torch.device) -> int:
    """Memory available for new allocations: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable
    from /proc/meminfo on CPU (1 GiB where neither can be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return _FALLBACK_FREE_BYTES


def gallery_chunk(num_probe: int, num_gallery: int, bytes_per_pair: int,
                  device: torch.device, chunk: Optional[int] = None) -> int:
    """Gallery images per chunk: ``chunk`` when given, else as many as keep one chunk's
    ``num_probe * chunk * bytes_per_pair`` temporaries within a share of the free memory."""
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive number of gallery images or None, got {chunk!r}")
        return chunk
    budget = int(free_bytes(device) * FREE_MEMORY_SHARE)
    per_gallery_image = max(1, num_probe * bytes_per_pair)
    return max(1, min(max(1, num_gallery), budget // per_gallery_image))
