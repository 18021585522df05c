"""Peak resident memory of a process on Linux, exactly: VmHWM (the high-water mark of RSS) is reset by writing
"5" to /proc/<pid>/clear_refs and read back from /proc/<pid>/status. Stdlib only, so child scripts and the
runner (outside the host venv) can use it."""
from __future__ import annotations

import ctypes
import gc
import os
import sys

# glibc's malloc pinned for measurements: by default each free of a large mmapped block raises the mmap threshold
# (up to 32 MB on 64-bit); from then on tensors below it come from heap arenas whose freed pages stay resident and
# fragment, so a peak depends on the order of frees. Six runs of one SD-1.5 step at 1024x512 read 323 to 527 MB
# (2026-12-02, this 2-core VM); with these set, every block above 128 KiB is its own mapping, returned on free, and
# three runs agreed to 0.1 MB.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_with_fixed_malloc(module: str, argv=None) -> None:
    """Re-execute ``python -m module argv`` with ``FIXED_MALLOC`` unless this process already has it (glibc reads
    these at start-up only). Call first thing in a measuring module's ``main``; returns only when already set."""
    if all(os.environ.get(k) == v for k, v in FIXED_MALLOC.items()):
        return
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **FIXED_MALLOC})


def proc_status(key: str, pid: int | str = "self") -> int | None:
    """``VmRSS``/``VmHWM``/... of ``pid`` in bytes (None if the process or the key is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM of ``pid`` to its current RSS; False where the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and hand the heap's free memory back to the kernel (glibc ``malloc_trim``). Without it, memory
    freed before a measurement (say a checkpoint's text encoder, loaded and dropped) is reused by the measured block
    without raising RSS, and the block's peak reads low."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak RSS growth of this process during a block: ``with PeakRSS() as p: ...; p.peak`` (bytes above the
    RSS at entry, after a garbage collection and a heap trim)."""

    def __enter__(self):
        trim_heap()
        reset_peak()
        self.base = proc_status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = proc_status("VmHWM") - self.base
