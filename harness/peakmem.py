"""Peak resident memory of a process on Linux, exactly: VmHWM (the high-water mark of RSS) is reset by writing
"5" to /proc/<pid>/clear_refs and read back from /proc/<pid>/status. Stdlib only, so child scripts and the
runner (outside the host venv) can use it."""
from __future__ import annotations

import ctypes
import gc


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
