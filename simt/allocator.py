"""Host memory reuse for CPU training (`trainer.keep_freed_memory`).

torch's CPU allocator hands every tensor to the C library's malloc and frees it when the tensor dies. With
glibc's defaults, blocks above the mmap threshold (at most 32 MiB, as it adapts) are fresh mappings,
returned to the kernel on free, and the heap is trimmed whenever 64 MiB or more lies free at its top. A
meta-training step at 84x84 allocates and frees gigabytes of activations (one second-order MAML + SiMT
step on Conv4 faults in ~2.6 million fresh, zeroed 4 KiB pages: ~10 GB), so a large part of a CPU step is
spent in the kernel. Keeping freed memory in the process lets the next step reuse it instead; the process's
resident size then stays at its peak, which it reaches on every step anyway.

This is glibc's `mallopt` (no large block is mmapped, the heap is never trimmed); on another C library it
does nothing. It is process-wide and can be undone (`glibc_defaults`), which the benchmark uses to run its
official-style baseline with the allocator a plain PyTorch process has. What is kept is handed back to the
system where the pattern of allocations changes (`evaluation()`, around every evaluation): memory kept
from one phase would otherwise sit beside the next phase's, when
that one needs blocks of other sizes (a kept heap reuses freed blocks, but does not compact them).
"""
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's dynamic thresholds at the top of their range (64-bit), the state a long-running default process
# settles in: blocks up to 32 MiB come from the heap, which is trimmed past 64 MiB free.
_DEFAULT_MMAP_THRESHOLD, _DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 32 << 20, 64 << 20, 65536
_NEVER_TRIM = (1 << 31) - 1  # the parameter is a C int


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _set(trim: int, mmap_threshold: int, mmap_max: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; mmap_max first: with it at 0 the threshold no longer matters
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_MAX, mmap_max), (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim)))


_kept = False  # whether keep_freed_memory is in effect in this process


def keep_freed_memory(on: bool = True) -> bool:
    """Reuse freed host memory (see the module docstring), or go back to glibc's (settled) defaults; a
    no-op off glibc, or when asked for what is already in effect. Returns whether it is in effect."""
    global _kept
    if on != _kept:
        changed = _set(_NEVER_TRIM, _DEFAULT_MMAP_THRESHOLD, 0) if on else \
            _set(_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_THRESHOLD, _DEFAULT_MMAP_MAX)
        _kept = on and changed
        log.debug("keep_freed_memory: %s", "on" if _kept else "off" if changed else "not available (not glibc)")
    return _kept


def apply(setting: bool | str, device) -> bool:
    """`trainer.keep_freed_memory`: true, false, or auto (on when training on the CPU: GPU tensors do not
    use malloc, and the CUDA allocator already caches). Returns whether it is on."""
    return keep_freed_memory(setting is True or (setting == "auto" and str(device).startswith("cpu")))


def release() -> None:
    """Hand the memory kept so far back to the system (glibc's malloc_trim); the next allocations fault
    fresh pages in once more. A no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def glibc_defaults():
    """Run the body with glibc's settled default settings, from a released heap (as a process that never
    kept memory), then restore what was in effect."""
    was = _kept
    keep_freed_memory(False)
    release()
    try:
        yield
    finally:
        keep_freed_memory(was)


@contextlib.contextmanager
def evaluation(batched: bool):
    """Around an evaluation, when memory is kept: what training kept does not fit evaluation's block sizes,
    nor the other way round, so it is handed back before and after. Vmapped chunks fragment a kept heap
    (20 episodes at 84x84 5-shot: over 24 GB kept against 14.6 GB with glibc's defaults, measured), so a
    `batched` evaluation runs with glibc's defaults. Nothing happens when memory is not kept."""
    if not _kept:
        yield
        return
    release()
    try:
        with glibc_defaults() if batched else contextlib.nullcontext():
            yield
    finally:
        release()
