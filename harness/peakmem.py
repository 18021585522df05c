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


class PeakAllocated:
    """Peak of the bytes live in torch's CPU allocator during a block, above those live at entry: the CPU
    counterpart of CUDA's ``max_memory_allocated() - memory_allocated()``. Peak RSS also counts what no tensor
    holds (oneDNN's and the allocator's retained pages); this counts tensors and the kernels' workspaces that go
    through torch's allocator, as a GPU's caching allocator would. It runs the block under ``torch.profiler`` with
    memory profiling (every allocation and free, with its time), so the block runs slower.

    ``with PeakAllocated() as p: ...``; then ``p.peak``, and ``p.peak_between(t0, t1)`` for a part of the block
    (``time.time_ns()`` stamps, the profiler's clock)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        self.times, self.live, cur = [], [], 0
        for t, n in events:
            cur += n
            self.times.append(t)
            self.live.append(cur)
        # (as on CUDA: what was live at entry and freed inside lets the block allocate that much again unseen)
        self.peak = self.peak_between(None, None)
        self.prof = None

    def live_at(self, t) -> int:
        """Bytes live at time ``t`` above the block's start."""
        import bisect
        i = bisect.bisect_right(self.times, t)
        return self.live[i - 1] if i > 0 else 0

    def peak_between(self, t0, t1) -> int:
        """The highest live-byte count from ``t0`` to ``t1`` (None: the block's start / end), above the block's
        start (a part's peak counts what earlier parts left alive)."""
        import bisect
        i = 0 if t0 is None else bisect.bisect_left(self.times, t0)
        j = len(self.times) if t1 is None else bisect.bisect_right(self.times, t1)
        before = self.live[i - 1] if i > 0 else 0
        return max([before, *self.live[i:j]])
