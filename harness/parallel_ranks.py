"""Forked gloo ranks on loopback for the spatial-parallel tests and benchmarks.

The caller builds the model once; ``run_ranks`` forks the ranks, so they share its weights copy-on-write (four
copies of an SD-XL UNet would not fit a 24 GB machine). Each rank runs ``fn(rank, world)`` single-threaded inside
a gloo process group and hands back a picklable result. A rank that fails ends the others at once; a run past
``timeout`` is killed. No rank outlives the call."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world: int, port: int, out: Path, threads: int, pg_timeout: float) -> None:
    code = 1
    try:
        import torch.distributed as dist
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=pg_timeout))
        try:
            with torch.no_grad():
                res = fn(rank, world)
            torch.save(res, out / f"{rank}.pt")
        finally:
            dist.destroy_process_group()
        code = 0
    except BaseException:
        (out / f"{rank}.err").write_text(traceback.format_exc())
    finally:
        os._exit(code)  # a forked child of pytest must not run the parent's exit handlers


def run_ranks(fn, world: int, timeout: float = 600, threads: int = 1, pg_timeout: float = 300) -> list:
    """[fn(0, world), ..., fn(world-1, world)], each run in a forked process that is rank r of a gloo group."""
    ctx = mp.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="linfusion-ranks-") as d:
        out = Path(d)
        procs = [ctx.Process(target=_child, args=(fn, r, world, port, out, threads, pg_timeout), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # one rank failed: the others would wait for it until the group times out
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks still running after {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(10)
        errors = [f"rank {r} (exit {p.exitcode}):\n{(out / f'{r}.err').read_text() if (out / f'{r}.err').exists() else ''}"
                  for r, p in enumerate(procs) if p.exitcode != 0]
        errors.sort(key=lambda e: "gloo" in e)  # the rank that failed first, not the ones it left waiting
        if errors:
            raise RuntimeError("ranks failed:\n" + "\n".join(errors))
        return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]
