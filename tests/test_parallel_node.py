"""LinFusionSpatialParallel in a real ComfyUI: a server of its own (SD-1.5 weights stored in fp16, computed in fp32
on the CPU), graphs run through its HTTP API, the node's worker processes started by the server itself.

Single device against ``devices = cpu,cpu`` for the same graph: the sampled latents are equal to float rounding,
with a LoRA too; the workers get the weights once per weight change; a dead worker ends the prompt with a clear
error and the next prompt works; an interrupt ends the prompt and keeps the workers; the workers exit when ComfyUI
dies. Nothing is mocked."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import linfusion_fixtures
from harness.graphs import Graph, checkpoint, linfusion, txt2img
from harness.host import PromptError, default_server

pytestmark = pytest.mark.server

TOL = 1e-5  # max |parallel - single| / max |single| of the sampled latent, fp32 compute


@pytest.fixture(scope="module")
def srv(host, install_checkpoint, base_dir):
    install_checkpoint("sd15")
    root = base_dir / "models" / "linfusion" / "tests"
    linfusion_fixtures.write("sd15", root / "sd15-parallel.safetensors", layout="file", seed=13)
    _write_lora(base_dir / "models" / "loras" / "test-parallel-lora.safetensors")
    s = default_server(extra_args=["--fp16-unet"])
    s.start()
    yield s
    s.stop()


def _write_lora(path: Path) -> None:
    """A LoRA on an attn1 (LinFusion's projections get it too), an attn2 and a conv of SD-1.5, ComfyUI's generic
    key format."""
    g = torch.Generator().manual_seed(21)
    sd = {}
    for key, (o, i) in {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (320, 320),
                        "output_blocks.9.1.transformer_blocks.0.attn2.to_v": (320, 768),
                        "input_blocks.4.0.in_layers.2": (640, 320 * 9)}.items():
        up = torch.randn(o, 4, generator=g) * 0.3
        down = torch.randn(4, i, generator=g) * 0.3
        if key.endswith("in_layers.2"):
            up, down = up[..., None, None], down.reshape(4, 320, 3, 3)
        sd[f"diffusion_model.{key}.lora_up.weight"] = up
        sd[f"diffusion_model.{key}.lora_down.weight"] = down
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def _graph(devices=None, lora=None, steps=3, seed=0, width=256, height=192, prefix="par", softmax_below=None):
    g = Graph()
    model, clip, _ = checkpoint(g, "test-sd15.safetensors")
    if lora is not None:
        model = g.out(g.add("LoraLoaderModelOnly", model=model, lora_name="test-parallel-lora.safetensors",
                            strength_model=lora))
    model = linfusion(g, model, "tests/sd15-parallel.safetensors", softmax_below_tokens=softmax_below)
    if devices is not None:
        model = g.out(g.add("LinFusionSpatialParallel", model=model, devices=devices))
    txt2img(g, model, clip, width=width, height=height, steps=steps, seed=seed, save_latent=f"latents/{prefix}")
    return g.prompt()


def _latent(s, entry) -> np.ndarray:
    (item,) = [i for out in entry["outputs"].values() for i in out.get("latents", [])]
    p = Path(s.base_dir) / "output" / item.get("subfolder", "") / item["filename"]
    return load_file(str(p))["latent_tensor"].float().numpy()


def _err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _workers(s) -> list:
    """Pids of the workers the server says it started, newest last."""
    return [int(p) for p in re.findall(r"started worker rank \d+ on \S+ \(pid (\d+)\)", s.log_text())]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_graph_on_two_cpu_ranks_equals_one_device(srv):
    want = _latent(srv, srv.run(_graph(prefix="single")))
    got = _latent(srv, srv.run(_graph("cpu,cpu", prefix="two")))
    err = _err(got, want)
    print(f"3 Euler steps, SD-1.5 latent 24x32 (batch 2 with CFG), 2 CPU ranks: max rel err {err:.2e}")
    assert err < TOL, err
    assert len(_workers(srv)) == 1
    assert srv.log_text().count("weights sent to 1 worker") == 1
    # What a step moves, logged once for the size (3 steps, 2 ranks): the halo rows and the LinFusion states.
    (line,) = re.findall(r"latent 2x4x24x32 on 2 ranks, band rows \[0, \d+, 24\]: rank 0 sent .*", srv.log_text())
    assert re.search(r"halo \d+\.\d\d MB", line) and re.search(r"linfusion_state \d+\.\d\d MB", line), line


def test_lora_weights_reach_the_workers_once_per_change(srv):
    sends = srv.log_text().count("weights sent to 1 worker")
    want = _latent(srv, srv.run(_graph(lora=0.8, seed=1, prefix="lora_single")))
    got = _latent(srv, srv.run(_graph("cpu,cpu", lora=0.8, seed=1, prefix="lora_two")))
    plain = _latent(srv, srv.run(_graph("cpu,cpu", seed=1, prefix="lora_none")))
    err = _err(got, want)
    print(f"with a LoRA at 0.8: max rel err {err:.2e}; LoRA effect {_err(want, plain):.2e}")
    assert err < TOL, err
    assert _err(want, plain) > 100 * TOL  # the LoRA changed the picture, so the workers had it
    # Same weights, another seed: nothing sent again.
    again = srv.log_text().count("weights sent to 1 worker")
    srv.run(_graph("cpu,cpu", seed=2, prefix="lora_none2"))
    assert srv.log_text().count("weights sent to 1 worker") == again
    assert again - sends == 2  # LoRA on, then LoRA off
    assert len(_workers(srv)) == 1  # kept across prompts


def test_layers_left_on_softmax_gather_their_keys_with_one_warning_per_layer(srv):
    # Latent 24x32: 768, 192 and 48 tokens at the levels with attention; below 200 the last two stay softmax.
    start = len(srv.log_text())
    want = _latent(srv, srv.run(_graph(seed=10, prefix="soft_single", softmax_below=200)))
    got = _latent(srv, srv.run(_graph("cpu,cpu", seed=10, prefix="soft_two", softmax_below=200)))
    err = _err(got, want)
    print(f"softmax below 200 tokens, 2 CPU ranks: max rel err {err:.2e}")
    assert err < TOL, err
    warned = re.findall(r"softmax self-attention (\S+) runs on all-gathered keys", srv.log_text()[start:])
    assert warned and len(warned) == len(set(warned)), warned  # 3 steps, 2 calls each: one warning a layer


def test_bad_devices_are_named_and_the_server_stays_up(srv):
    for devices, words in (("cpu", ["two or more"]), ("cpu,cuda:0", ["must be CUDA GPUs or all CPUs"]),
                           ("cuda:0,cuda:1", ["cuda:0", "must be the one ComfyUI runs"] if torch.cuda.is_available()
                            else ["not found", "0 CUDA device"]), ("cpu,potato", ["potato"])):
        with pytest.raises(PromptError) as e:
            srv.run(_graph(devices, steps=1, prefix="bad"))
        for w in words:
            assert w in str(e.value), (devices, str(e.value))
    assert srv.alive()


def _queue_and_wait_for_step(srv, prompt, steps, timeout=600):
    """Queue ``prompt``; return its id once its sampler has finished a step (ComfyUI's progress bar in the log)."""
    start = len(srv.log_text())
    pid = srv.queue_prompt(prompt)
    deadline = time.time() + timeout
    while not re.search(rf"\b[1-9]\d*/{steps} \[", srv.log_text()[start:]):
        assert time.time() < deadline, srv.log_tail()
        time.sleep(0.2)
    return pid


def test_dead_worker_ends_the_prompt_with_a_clear_error_and_the_next_one_works(srv):
    srv.run(_graph("cpu,cpu", steps=1, seed=3, prefix="warm"))
    (old,) = _workers(srv)[-1:]
    pid = _queue_and_wait_for_step(srv, _graph("cpu,cpu", steps=40, seed=4, prefix="killed"), 40)
    os.kill(old, signal.SIGKILL)
    entry = srv.wait(pid)
    msg = " ".join(str(d.get("exception_message", "")) for k, d in entry["status"]["messages"]
                   if k == "execution_error")
    assert "worker rank 1 on cpu" in msg and "exited" in msg and "next prompt starts new" in msg, msg
    assert srv.alive()
    want = _latent(srv, srv.run(_graph(seed=5, prefix="after_single")))
    got = _latent(srv, srv.run(_graph("cpu,cpu", seed=5, prefix="after_two")))
    assert _err(got, want) < TOL
    assert _workers(srv)[-1] != old and _alive(_workers(srv)[-1])


def test_interrupt_ends_the_prompt_and_keeps_the_workers(srv):
    srv.run(_graph("cpu,cpu", steps=1, seed=6, prefix="warm2"))
    worker = _workers(srv)[-1]
    pid = _queue_and_wait_for_step(srv, _graph("cpu,cpu", steps=40, seed=7, prefix="interrupted"), 40)
    srv.post("/interrupt", {})
    entry = srv.wait(pid)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert _alive(worker) and _workers(srv)[-1] == worker
    srv.run(_graph("cpu,cpu", steps=1, seed=8, prefix="after_interrupt"))
    assert _workers(srv)[-1] == worker


def test_workers_exit_when_comfyui_dies(srv):
    srv.run(_graph("cpu,cpu", steps=1, seed=9, prefix="last"))
    workers = [w for w in _workers(srv) if _alive(w)]
    assert workers
    os.kill(srv.proc.pid, signal.SIGKILL)  # the ComfyUI process alone, not its process group
    srv.proc.wait()
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
