"""Run a bundled (UI-format) workflow headless against the ComfyUI host.

    python -m harness.runner workflows/linfusion_sd15_16k.json --scale 0.0625 --steps-scale 0.1 --out DIR

1. The UI file is converted into an API prompt by the real frontend (headless Chromium: app.loadGraphData +
   app.graphToPrompt), exactly what the Queue button sends.
2. Overrides are applied to that API prompt: ``--scale`` multiplies every pixel size (EmptyLatentImage,
   ImageScale, CLIPTextEncodeSDXL sizes, VAE tile sizes; rounded to multiples of 8 and clamped to the node's
   limits) and ``softmax_below_tokens`` by scale² (tokens grow with area), ``--steps-scale`` multiplies KSampler
   steps (denoise kept), ``--ckpt/--linfusion/--image`` pick the model files and input image,
   ``--no-linfusion`` rewires every Apply LinFusion's consumers to its input model (the stock run).
3. The prompt is queued with a websocket client id; ``executing``/``progress``/``executed`` messages are printed
   per node, and for every node its wall time and the server process's peak memory are recorded.

Memory method (CPU): the peak resident set (VmHWM) of the server process, reset through
/proc/<pid>/clear_refs ("5") when a node starts and read when the next one starts; so the number is the true
peak RSS during that node (not a sample). When the server runs on a GPU, the peak of the GPU memory used by the
server process is sampled from nvidia-smi every 0.2 s as well. Stages are the frontend groups of the workflow.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .peakmem import proc_status, reset_peak

SIZE_INPUTS = {"width", "height", "target_width", "target_height", "crop_w", "crop_h"}
TILE_INPUTS = {"tile_size", "overlap"}


# ------------------------------------------------------------------------------------------------ conversion
def convert(server_url: str, workflow: dict) -> dict:
    """UI workflow -> API prompt, by the real frontend served at server_url."""
    from .frontend import Frontend
    with Frontend(server_url) as fe:
        return fe.to_api(workflow)


def _round_to(v: float, step: int, lo: int, hi: int) -> int:
    step = max(1, int(step or 1))
    r = int(round(v / step)) * step
    return int(min(max(r, lo), hi))


def scale_prompt(api: dict, object_info: dict, scale: float = 1.0, steps_scale: float = 1.0,
                 min_steps: int = 1) -> dict:
    """A copy of ``api`` with pixel sizes x scale and sampler steps x steps_scale (see module doc)."""
    api = copy.deepcopy(api)
    for node in api.values():
        spec = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, v in list(node["inputs"].items()):
            if isinstance(v, list) or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            opts = specs.get(name, [None, {}])
            opts = opts[1] if len(opts) > 1 and isinstance(opts[1], dict) else {}
            lo, hi = opts.get("min", 0), opts.get("max", 1 << 30)
            if scale != 1.0 and name in SIZE_INPUTS and v:
                node["inputs"][name] = _round_to(v * scale, 8, max(lo, 8 if name in ("width", "height") else 0), hi)
            elif scale != 1.0 and name in TILE_INPUTS and "VAE" in node["class_type"]:
                # Tiles stay >= 256 px (overlap >= 32): smaller tiles only multiply the per-tile overhead.
                floor = 256 if name == "tile_size" else 32
                node["inputs"][name] = _round_to(max(v * scale, min(v, floor)), opts.get("step", 32), lo, hi)
            elif scale != 1.0 and name == "softmax_below_tokens" and v:
                node["inputs"][name] = int(min(max(math.ceil(v * scale * scale), 1), hi))
            elif steps_scale != 1.0 and name == "steps" and "sampler" in node["class_type"].lower():
                node["inputs"][name] = max(min_steps, int(round(v * steps_scale)))
    return api


def set_models(api: dict, ckpt: str | None = None, linfusion: str | None = None, image: str | None = None,
               extra: dict | None = None) -> dict:
    """Pick the model files / input image: {class_type: {input: value}} style overrides."""
    api = copy.deepcopy(api)
    table = {"CheckpointLoaderSimple": {"ckpt_name": ckpt}, "LinFusionLoader": {"linfusion_name": linfusion},
             "LoadImage": {"image": image}}
    for ct, ov in (extra or {}).items():
        table.setdefault(ct, {}).update(ov)
    for node in api.values():
        for name, value in table.get(node["class_type"], {}).items():
            if value is not None and name in node["inputs"]:
                node["inputs"][name] = value
    return api


def bypass_linfusion(api: dict) -> dict:
    """The stock graph: every consumer of an ApplyLinFusion output reads that node's input model instead;
    ApplyLinFusion and then-unused LinFusionLoader nodes are removed."""
    api = copy.deepcopy(api)
    apply_ids = {nid: n["inputs"]["model"] for nid, n in api.items() if n["class_type"] == "ApplyLinFusion"}
    for nid in apply_ids:
        del api[nid]
    for node in api.values():
        for name, v in node["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and str(v[0]) in apply_ids:
                node["inputs"][name] = apply_ids[str(v[0])]
    used = {str(v[0]) for n in api.values() for v in n["inputs"].values() if isinstance(v, list) and len(v) == 2}
    for nid in [k for k, n in api.items() if n["class_type"] == "LinFusionLoader" and k not in used]:
        del api[nid]
    return api


def stage_of_nodes(workflow: dict) -> dict:
    """{node id (str): title of the frontend group containing it}."""
    out = {}
    for n in workflow.get("nodes", []):
        x, y = n["pos"][:2] if isinstance(n["pos"], list) else (n["pos"]["0"], n["pos"]["1"])
        for g in workflow.get("groups", []):
            gx, gy, gw, gh = g["bounding"]
            if gx <= x <= gx + gw and gy <= y <= gy + gh:
                out[str(n["id"])] = g["title"]
                break
    return out


# ------------------------------------------------------------------------------------------------ memory
def _status(pid: int, key: str) -> int | None:
    return proc_status(key, pid)


class MemoryProbe:
    """Peak memory of the server process per node: VmHWM reset via clear_refs (CPU RSS); GPU via nvidia-smi."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.can_reset = False
        if pid:
            self.can_reset = reset_peak(pid)
        self.rss_peak = 0
        self.gpu_peak = 0
        self._gpu = bool(shutil.which("nvidia-smi")) and pid is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def method(self) -> str:
        m = ("peak RSS of the server process (VmHWM, reset via /proc/<pid>/clear_refs at each node start)"
             if self.can_reset else "RSS of the server process sampled every 50 ms from /proc/<pid>/status")
        if self._gpu:
            m += "; GPU memory of the server process sampled every 0.2 s with nvidia-smi"
        return m

    def _sample(self):
        last_gpu = 0.0
        while not self._stop.is_set():
            if self.pid:
                r = _status(self.pid, "VmRSS")
                if r:
                    self.rss_peak = max(self.rss_peak, r)
                if self._gpu and time.time() - last_gpu > 0.2:
                    last_gpu = time.time()
                    try:
                        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                             timeout=5).stdout
                        for line in out.splitlines():
                            p, mem = [s.strip() for s in line.split(",")[:2]]
                            if p == str(self.pid):
                                self.gpu_peak = max(self.gpu_peak, int(mem) * 2**20)
                    except Exception:
                        pass
            self._stop.wait(0.05)

    def reset(self) -> dict:
        """Return the peak since the last reset and start a new interval."""
        hwm = _status(self.pid, "VmHWM") if (self.pid and self.can_reset) else None
        res = {"rss_peak": max(hwm or 0, self.rss_peak), "gpu_peak": self.gpu_peak or None}
        if self.can_reset:
            reset_peak(self.pid)
        self.rss_peak = _status(self.pid, "VmRSS") or 0 if self.pid else 0
        self.gpu_peak = 0
        return res

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)


# ------------------------------------------------------------------------------------------------ running
async def _run_ws(url: str, api: dict, pid: int | None, timeout: float, log=print) -> dict:
    import aiohttp
    client_id = uuid.uuid4().hex
    ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    probe = MemoryProbe(pid)
    nodes: dict = {}
    order: list = []
    current = None
    t_start = time.time()
    result = {"status": None, "error": None}
    rss_start = _status(pid, "VmRSS") if pid else None

    def close_node(now):
        if current is not None:
            rec = nodes[current]
            rec["seconds"] = round(now - rec["t0"], 3)
            peaks = probe.reset()
            rec["rss_peak"] = peaks["rss_peak"]
            rec["gpu_peak"] = peaks["gpu_peak"]
            log(f"  done  {current:>4} {rec['class_type']:<24} {rec['seconds']:8.2f}s  "
                f"peak RSS {rec['rss_peak'] / 2**30:6.2f} GiB" +
                (f"  GPU {rec['gpu_peak'] / 2**30:6.2f} GiB" if rec["gpu_peak"] else ""))

    prompt_id = None
    try:
        async with aiohttp.ClientSession() as session:
            # No heartbeat: a busy server (a long CPU-bound node) answers pings late; reconnect if it drops.
            ws = await session.ws_connect(ws_url, max_msg_size=0, heartbeat=None)
            async with session.post(url + "/prompt", json={"prompt": api, "client_id": client_id}) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise RuntimeError(f"/prompt refused the prompt: {json.dumps(body)[:3000]}")
            prompt_id = body["prompt_id"]
            probe.reset()
            deadline = time.time() + timeout
            while True:
                    msg = await ws.receive(timeout=max(1.0, deadline - time.time()))
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        continue  # latent previews
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        async with session.get(url + f"/history/{prompt_id}") as r:
                            hist = await r.json(content_type=None)
                        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                            close_node(time.time())
                            st = hist[prompt_id]["status"]
                            result["status"] = st.get("status_str")
                            break
                        log(f"  (websocket dropped: {msg.type}; reconnecting)")
                        await asyncio.sleep(1)
                        ws = await session.ws_connect(ws_url, max_msg_size=0, heartbeat=None)
                        continue
                    m = json.loads(msg.data)
                    kind, data = m.get("type"), m.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    now = time.time()
                    if kind == "executing":
                        close_node(now)
                        current = data.get("node")
                        if current is None:
                            result["status"] = "success"
                            break
                        ct = api.get(str(current), {}).get("class_type", "?")
                        nodes[current] = {"node": current, "class_type": ct,
                                          "title": api.get(str(current), {}).get("_meta", {}).get("title", ct),
                                          "t0": now}
                        order.append(current)
                        log(f"  start {current:>4} {ct}")
                    elif kind == "progress":
                        v, mx = data.get("value"), data.get("max")
                        if mx and (v == mx or v == 1 or v % max(1, mx // 5) == 0):
                            log(f"        {data.get('node')} step {v}/{mx}")
                    elif kind == "executed":
                        out = data.get("output") or {}
                        if data.get("node") in nodes:
                            nodes[data["node"]]["images"] = out.get("images", [])
                    elif kind == "execution_cached":
                        for n in data.get("nodes", []):
                            nodes[n] = {"node": n, "class_type": api.get(str(n), {}).get("class_type", "?"),
                                        "cached": True, "seconds": 0.0}
                    elif kind == "execution_error":
                        close_node(now)
                        current = None
                        result["status"] = "error"
                        result["error"] = (f"{data.get('node_type')}: {data.get('exception_type')}: "
                                           f"{data.get('exception_message')}")
                        break
                    elif kind == "execution_interrupted":
                        result["status"] = "interrupted"
                        break
                    if time.time() > deadline:
                        raise TimeoutError("workflow did not finish in time")
            if result.get("status") == "success":
                # Output nodes served from ComfyUI's cache send no "executed" message; the history has them.
                async with session.get(url + f"/history/{prompt_id}") as r:
                    hist = await r.json(content_type=None)
                for nid, out in hist.get(prompt_id, {}).get("outputs", {}).items():
                    if out.get("images") and not nodes.get(nid, {}).get("images"):
                        rec = nodes.setdefault(nid, {"node": nid, "cached": True, "seconds": 0.0,
                                                     "class_type": api.get(str(nid), {}).get("class_type", "?")})
                        rec["images"] = out["images"]
                        if nid not in order:
                            order.append(nid)
            await ws.close()
    finally:
        probe.close()
    for rec in nodes.values():
        rec.pop("t0", None)
    result.update(prompt_id=prompt_id, seconds=round(time.time() - t_start, 2), memory_method=probe.method,
                  rss_at_start=rss_start, nodes=[nodes[n] for n in order])
    return result


def run_prompt(url: str, api: dict, pid: int | None = None, timeout: float = 7200, log=print) -> dict:
    """Queue ``api`` and follow it over the websocket; runs its own event loop in a worker thread (so it works
    next to Playwright's sync API, which keeps a loop in the calling thread)."""
    box = {}

    def work():
        try:
            box["result"] = asyncio.run(_run_ws(url, api, pid, timeout, log))
        except BaseException as e:  # re-raised in the caller
            box["error"] = e
    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def image_size(path: Path):
    from PIL import Image
    with Image.open(path) as im:
        return list(im.size)


def collect(result: dict, api: dict, base_dir: Path, out_dir: Path | None, stages: dict, tag: str = "") -> dict:
    """Copy output/preview images into out_dir, add sizes, and aggregate nodes into stages."""
    images = []
    for rec in result["nodes"]:
        for img in rec.get("images", []) or []:
            p = Path(base_dir) / img.get("type", "output") / img.get("subfolder", "") / img["filename"]
            entry = {"node": rec["node"], "class_type": rec["class_type"], "kind": img.get("type"), "path": str(p)}
            if p.exists():
                entry["size"] = image_size(p)
                if out_dir:
                    dst = Path(out_dir) / f"{tag}{p.name}"
                    shutil.copy(p, dst)
                    entry["copied_to"] = str(dst)
            images.append(entry)
    agg: dict = {}
    for rec in result["nodes"]:
        st = stages.get(str(rec["node"]), "setup (loaders, prompts)")
        a = agg.setdefault(st, {"stage": st, "seconds": 0.0, "vae_seconds": 0.0, "rss_peak": 0, "gpu_peak": 0,
                                "nodes": []})
        a["seconds"] = round(a["seconds"] + rec.get("seconds", 0.0), 3)
        if is_vae_node(rec["class_type"]):
            a["vae_seconds"] = round(a["vae_seconds"] + rec.get("seconds", 0.0), 3)
        a["rss_peak"] = max(a["rss_peak"], rec.get("rss_peak") or 0)
        a["gpu_peak"] = max(a["gpu_peak"], rec.get("gpu_peak") or 0)
        a["nodes"].append(rec["class_type"])
        if rec["class_type"] in ("KSampler", "KSamplerAdvanced"):
            lat = _latent_size(api, str(rec["node"]))
            if lat:
                a["size"] = lat
    for a in agg.values():
        a["vae_share"] = round(a["vae_seconds"] / a["seconds"], 4) if a["seconds"] else 0.0
    result["images"] = images
    result["stages"] = list(agg.values())
    return result


def is_vae_node(class_type: str) -> bool:
    """VAE encode/decode nodes (ComfyUI's, tiled or not, and this pack's tiled ones)."""
    return "VAEDecode" in class_type or "VAEEncode" in class_type


def _latent_size(api: dict, nid: str):
    """Pixel size a sampler works at, traced through the prompt (EmptyLatentImage or the encoded ImageScale)."""
    node = api.get(nid)
    seen = 0
    while node is not None and seen < 20:
        seen += 1
        ins = node["inputs"]
        if node["class_type"] == "EmptyLatentImage" or (node["class_type"] == "ImageScale" and ins.get("width")):
            return [ins["width"], ins["height"]]
        src = ins.get("latent_image") or ins.get("pixels") or ins.get("image")
        node = api.get(str(src[0])) if isinstance(src, list) else None
    return None


def print_table(label: str, result: dict, log=print) -> None:
    log(f"{label}: {result['status']} in {result['seconds']:.1f}s ({result['memory_method']})")
    for st in result.get("stages", []):
        size = "x".join(map(str, st.get("size", []))) or "-"
        gpu = f"  GPU {st['gpu_peak'] / 2**30:6.2f} GiB" if st.get("gpu_peak") else ""
        vae = f"  VAE {st.get('vae_seconds', 0.0):7.2f}s ({100 * st.get('vae_share', 0.0):3.0f}%)"
        log(f"  {st['stage'][:60]:<60} {size:>11} {st['seconds']:8.2f}s{vae}  peak RSS {st['rss_peak'] / 2**30:6.2f} GiB"
            f"{gpu}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", type=Path)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every pixel size (default 1)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply sampler steps (denoise kept)")
    ap.add_argument("--ckpt", help="ckpt_name for every CheckpointLoaderSimple")
    ap.add_argument("--linfusion", help="linfusion_name for every LinFusionLoader")
    ap.add_argument("--image", type=Path, help="input image for LoadImage (copied into the server's input/)")
    ap.add_argument("--no-linfusion", action="store_true", help="bypass every Apply LinFusion (stock run)")
    ap.add_argument("--server", help="URL of a running ComfyUI (default: start the host's own)")
    ap.add_argument("--server-pid", type=int, help="pid of that server, for memory numbers")
    ap.add_argument("--out", type=Path, default=Path("results") / time.strftime("run-%Y%m%d-%H%M%S"))
    ap.add_argument("--server-args", default="", help="extra ComfyUI arguments when the runner starts it")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workflow = json.loads(args.workflow.read_text())
    srv = None
    from .host import default_server
    if args.server:
        url, pid, base = args.server.rstrip("/"), args.server_pid, None
    else:
        srv = default_server(extra_args=args.server_args.split()).start()
        url, pid, base = srv.url, srv.proc.pid, Path(srv.base_dir)
    try:
        import urllib.request
        with urllib.request.urlopen(url + "/object_info", timeout=120) as r:
            oi = json.loads(r.read())
        print(f"converting {args.workflow} with the real frontend (headless Chromium)")
        api = convert(url, workflow)
        image = None
        if args.image:
            if base is None:
                raise SystemExit("--image needs the runner's own server (it copies into input/)")
            shutil.copy(args.image, base / "input" / args.image.name)
            image = args.image.name
        api = set_models(api, ckpt=args.ckpt, linfusion=args.linfusion, image=image)
        api = scale_prompt(api, oi, args.scale, args.steps_scale)
        if args.no_linfusion:
            api = bypass_linfusion(api)
        (args.out / "prompt.json").write_text(json.dumps(api, indent=1))
        res = run_prompt(url, api, pid)
        collect(res, api, base or Path("."), args.out, stage_of_nodes(workflow))
        (args.out / "report.json").write_text(json.dumps(res, indent=2))
        print_table(args.workflow.name, res)
        if res["status"] != "success":
            print(f"FAILED: {res.get('error')}")
            return 1
        print(f"results in {args.out}")
        return 0
    finally:
        if srv:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
