"""LinFusion headless launcher: run ComfyUI workflows with their UNet steps split across the ranks of a
``torchrun`` job, on one machine or several (LinFusion Spatial Parallel, exact: the same image as one device).

Every rank runs this file. Rank 0 starts ComfyUI (its main.py, headless, on 127.0.0.1) with the launcher's
process group in its environment, queues each workflow, waits for it, prints what it wrote, and stops ComfyUI.
The other ranks are workers: they join the group and run their band of every UNet step that ComfyUI's
LinFusion Spatial Parallel node sends, until rank 0 says exit.

Two machines with 4 GPUs each (on both; ``--node-rank 1`` on the second; MASTER_ADDR is the first machine's
address, reachable from the second):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr 10.0.0.1 --master-port 29500 \\
        ComfyUI/custom_nodes/ComfyUI-LinFusion/launch.py --workflow my_workflow_api.json

    --workflow   a workflow in ComfyUI's API format (the frontend's Export (API)); it must hold a
                 LinFusion Spatial Parallel node (its ``devices`` text is ignored here: the ranks are torchrun's).
                 Give several to run them one after another on the same workers.
    --comfyui    the ComfyUI folder (default: the one this pack is installed in, else COMFYUI_PATH)
    after ``--`` ComfyUI's own arguments, e.g. ``-- --base-directory /data/comfy --fp16-unet`` (``--cpu`` runs every
                 rank on its CPU with gloo; otherwise rank r computes on GPU LOCAL_RANK with NCCL).

Every machine needs the same ComfyUI, this pack and the model files (rank 0 loads the models; it sends the weights
to the other ranks itself). Exit code: 0 when every workflow ran, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
NODE = "LinFusionSpatialParallel"
LAUNCHER_ENV = "LINFUSION_LAUNCHER"  # nodes/parallel.py reads it: ComfyUI joins the launcher's ranks as rank 0
OWN_ROOT = "comfyui_linfusion_launch"  # the name a worker imports this pack under when it has no other
# Python put this folder first on the path (the script's own); its nodes/ package would shadow ComfyUI's nodes.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACK_DIR]


def comfy_dir(given: str | None) -> Path:
    for c in (given, os.environ.get("COMFYUI_PATH"),
              PACK_DIR.parent.parent if PACK_DIR.parent.name == "custom_nodes" else None):
        if c and (Path(c) / "main.py").is_file():
            return Path(c).resolve()
    raise SystemExit(f"launch.py: no ComfyUI found (looked at --comfyui {given!r}, COMFYUI_PATH and "
                     f"{PACK_DIR.parent.parent}); give --comfyui PATH, the folder that holds ComfyUI's main.py")


def import_core(root: str, comfy: str, device: str):
    """This pack's linfusion_core.parallel, imported under the package name ``root`` without running the pack's
    __init__ (the ComfyUI nodes), with ComfyUI importable and set to ``device``'s kind (the modules rank 0 sends
    are ComfyUI's classes)."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.set_device(torch.device(device))  # before ComfyUI picks its device: this worker's GPU
    sys.path.insert(0, comfy)
    parts = root.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [str(PACK_DIR)] if i == len(parts) - 1 else []
            sys.modules[name] = m
    from comfy.cli_args import args  # ComfyUI's defaults; no parsing of this process's arguments
    args.cpu = device == "cpu"
    return importlib.import_module(root + ".linfusion_core.parallel")


def node_worker(argv: list) -> None:
    """A worker started by the LinFusion Spatial Parallel node of a ComfyUI process (rank 0) on this machine."""
    root, comfy, rank, world, port, device, backend, parent = argv
    import_core(root, comfy, device).worker_main(rank, world, port, device, backend, parent)


def _cpu(extra: list) -> bool:
    import torch
    return "--cpu" in extra or not torch.cuda.is_available()


def torchrun_worker(extra: list) -> None:
    local, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpu = _cpu(extra)
    device = "cpu" if cpu else f"cuda:{local}"
    par = import_core(OWN_ROOT, str(comfy_dir(OPTS.comfyui)), device)
    print(f"launch.py: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on {device}, waiting for rank 0",
          flush=True)
    par.run_worker(device, "gloo" if cpu else "nccl", {}, threads_share=local_world)


# -- rank 0: ComfyUI ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def load_workflow(path: str) -> dict:
    try:
        wf = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"launch.py: cannot read the workflow {path}: {e}")
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        raise SystemExit(f"launch.py: {path} is a workflow in the frontend's format; export it in the API format "
                         f"(Workflow > Export (API)) and give that file")
    if not isinstance(wf, dict) or not all(isinstance(n, dict) and "class_type" in n for n in wf.values()):
        raise SystemExit(f"launch.py: {path} is not a ComfyUI workflow in the API format "
                         f"({{node id: {{class_type, inputs}}}})")
    if not any(n["class_type"] == NODE for n in wf.values()):
        print(f"launch.py: warning: {path} has no {NODE} node: it runs on rank 0 alone, the other ranks wait",
              flush=True)
    return wf


def run_prompt(url: str, path: str, wf: dict, proc: subprocess.Popen) -> bool:
    try:
        pid = _http(f"{url}/prompt", {"prompt": wf, "client_id": uuid.uuid4().hex})["prompt_id"]
    except urllib.error.HTTPError as e:
        print(f"launch.py: ComfyUI refused {path}: {e.read().decode(errors='replace')}", flush=True)
        return False
    while proc.poll() is None:
        entry = _http(f"{url}/history/{pid}").get(pid)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            if status.get("status_str") == "success":
                files = [f"{i.get('subfolder', '')}/{i['filename']}".lstrip("/") for out in entry["outputs"].values()
                         for items in out.values() if isinstance(items, list) for i in items
                         if isinstance(i, dict) and "filename" in i]
                print(f"launch.py: {path} done; wrote {', '.join(files) or 'nothing'}", flush=True)
                return True
            for kind, data in status.get("messages", []):
                if kind in ("execution_error", "execution_interrupted"):
                    print(f"launch.py: {path} failed in {data.get('node_type')}: "
                          f"{data.get('exception_message', kind)}", flush=True)
            return False
        time.sleep(0.5)
    print(f"launch.py: ComfyUI exited (code {proc.returncode}) while running {path}", flush=True)
    return False


def stop(proc: subprocess.Popen) -> None:
    """SIGINT, as Ctrl-C: ComfyUI exits normally and its exit handler lets the workers go."""
    for sig, wait in ((signal.SIGINT, 120), (signal.SIGTERM, 20), (signal.SIGKILL, 20)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def rank0(extra: list) -> int:
    comfy = comfy_dir(OPTS.comfyui)
    workflows = [(p, load_workflow(p)) for p in OPTS.workflow]
    cpu = _cpu(extra)
    port = _free_port()
    cmd = [sys.executable, str(comfy / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", *([] if cpu else ["--cuda-device", os.environ.get("LOCAL_RANK", "0")]), *extra]
    env = dict(os.environ, **{LAUNCHER_ENV: "1"})
    print(f"launch.py: rank 0 of {os.environ.get('WORLD_SIZE', '1')}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    ok = False
    try:
        while True:
            if proc.poll() is not None:
                print(f"launch.py: ComfyUI exited during start-up (code {proc.returncode})", flush=True)
                return 1
            try:
                _http(f"{url}/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        ok = all([run_prompt(url, p, wf, proc) for p, wf in workflows])
    finally:
        stop(proc)
    return 0 if ok and proc.returncode in (0, -signal.SIGINT) else 1


def main(argv: list) -> int:
    if argv[:1] == ["--worker"]:  # started by the node, not by a user
        node_worker(argv[1:])
        return 0
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", action="append", required=True, help="a workflow in the API format (repeatable)")
    p.add_argument("--comfyui", help="the ComfyUI folder (default: the one this pack sits in, or COMFYUI_PATH)")
    global OPTS
    OPTS = p.parse_args(ours)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("launch.py: run it under torchrun (RANK and WORLD_SIZE are not set), e.g. "
                         "torchrun --nproc-per-node 2 launch.py --workflow wf_api.json")
    if int(os.environ["RANK"]) == 0:
        return rank0(extra)
    torchrun_worker(extra)  # exits the process
    return 1


OPTS = None

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
