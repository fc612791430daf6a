"""What this machine offers a model: memory available now, and the check made before allocating one.

A model is always built on the meta device first (shapes, no storage), so its size is known before
a byte is allocated; a model that cannot fit is refused with the estimate instead of dying in the
allocator or the kernel's OOM killer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from omnifuse.errors import InsufficientMemoryError

__all__ = ["InsufficientMemoryError", "available_memory", "ensure_fits", "tensor_bytes"]

GIB = 1024 ** 3


def _cgroup_limit() -> int | None:
    """The container's memory limit minus what it uses (cgroup v2, then v1), if there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int | None:
    """Bytes a new allocation can take now without swapping (Linux MemAvailable, capped by a
    container limit); None where the platform does not say."""
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if found is None and hasattr(os, "sysconf"):
        try:
            found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            found = None
    limit = _cgroup_limit()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor once (works on meta tensors)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def ensure_fits(needed: int, what: str, device: str | torch.device = "cpu") -> None:
    """Raise InsufficientMemoryError when ``needed`` bytes exceed the memory available on ``device``."""
    if torch.device(device).type != "cpu":
        return  # accelerators report their own out-of-memory errors clearly
    free = available_memory()
    if free is not None and needed > free:
        raise InsufficientMemoryError(f"{what} needs about {_size(needed)} but this machine has "
                                      f"{_size(free)} of memory available")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"
