"""The prepared GPU check (benchmarks/gpu_check.py): its CPU dry mode end to end in a subprocess with the host's
Python, and its pure parts (bandwidth table, skip rules, prompt surgery, the committed API prompt, the device
command) on their own.

On a ComfyUI with DynamicVRAM (0.33 and later) the dry run also runs with --emulate-gpu-image: packages that the GPU
machine lacks and that benchmarks/gpu_prepare.py does not carry are unimportable, so a missing wheel shows here
rather than on the GPU machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_prepare  # noqa: E402

WORKFLOW = REPO / "workflows" / "linfusion_sd15_16k.json"


# --------------------------------------------------------------------------------------------- pure parts
def test_peak_bandwidth_by_card_name():
    assert gpu_check.peak_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert gpu_check.peak_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert gpu_check.peak_bandwidth("NVIDIA H100 NVL")[0] == 3.9e12
    assert gpu_check.peak_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert gpu_check.peak_bandwidth("NVIDIA GH200 480GB")[0] == 4.0e12
    bw, why = gpu_check.peak_bandwidth("NVIDIA GeForce RTX 4090")
    assert bw is None and "no peak bandwidth" in why
    assert gpu_check.peak_bandwidth(None)[0] is None


def test_unet_skip_rules():
    skip = gpu_check.unet_skip_reason
    GiB = 2**30
    # Stock: a configured latent-area limit, then ComfyUI's formula against the card's memory.
    assert "limited to" in skip("stock", 128, 1.0, None, None, 100, stock_max_latent_px=64)
    assert "memory formula" in skip("stock", 64, 90 * GiB, 80 * GiB, None, 100)
    assert skip("stock", 64, 10 * GiB, 80 * GiB, None, 100) is None
    assert skip("stock", 64, 90 * GiB, None, None, 100) is None  # no card memory (CPU): no formula skip
    # Time: stock quadratic in the latent area, the others linear (30 % margin).
    assert skip("stock", 4096, 1.0, None, (1024, 1.0), 100) is None          # 16 x 1.3 = 21 s
    assert "quadratic" in skip("stock", 4096, 1.0, None, (1024, 1.0), 20)
    assert skip("linfusion", 4096, 1.0, None, (1024, 1.0), 6) is None         # 4 x 1.3 = 5.2 s
    assert "linear" in skip("linfusion", 4096, 1.0, None, (1024, 1.0), 5)
    assert skip("no-self-attn", 4096, 1e30, 1.0, None, 1) is None            # the formula limits stock only
    assert "time is spent" in skip("linfusion", 64, 1.0, None, None, 0)


def _refs_resolve(api: dict) -> bool:
    return all(str(v[0]) in api for n in api.values() for v in n["inputs"].values()
               if isinstance(v, list) and len(v) == 2)


def test_chain_prompt_surgery():
    doc = json.loads(gpu_check.API_PROMPT.read_text())
    full = gpu_check.chain_prompt(doc, stages=5, steps=2, scale=1.0)
    assert set(full) == set(doc["prompt"]) and _refs_resolve(full)
    for nid, n in full.items():
        orig = doc["prompt"][nid]["inputs"]
        if n["class_type"] == "KSampler":
            assert n["inputs"]["steps"] == min(2, orig["steps"])
            assert n["inputs"]["denoise"] == orig["denoise"]  # denoise kept: the stage's last steps
        if n["class_type"] == "CheckpointLoaderSimple":
            assert n["inputs"]["ckpt_name"] == gpu_check.CKPT_NAME
        if n["class_type"] == "LinFusionLoader":
            assert n["inputs"]["linfusion_name"] == gpu_check.LINFUSION_NAME
    two = gpu_check.chain_prompt(doc, stages=2, steps=1, scale=1 / 16)
    assert _refs_resolve(two)
    stages = {gpu_check.stage_index(doc["stages"][nid]) for nid in two}
    assert stages == {0, 1, 2}
    assert sum(n["class_type"] == "KSampler" for n in two.values()) == 2
    assert any(n["class_type"] == "PreviewImage" for n in two.values())  # an output node is left
    sizes = {(n["inputs"]["width"], n["inputs"]["height"]) for n in two.values()
             if n["class_type"] in ("EmptyLatentImage", "ImageScale")}
    assert sizes == {(64, 32), (128, 64)}
    assert gpu_check.stage_index("Stage 5: 16384x8192, denoise 0.1") == 5 and gpu_check.stage_index(None) == 0


def test_committed_api_prompt_matches_the_workflow():
    """benchmarks/sd15_16k_api.json was converted by the frontend from the workflow file; if the workflow changes,
    regenerate it (python benchmarks/make_api_prompt.py)."""
    doc = json.loads(gpu_check.API_PROMPT.read_text())
    ui = json.loads(WORKFLOW.read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in ("MarkdownNote", "Note")}
    assert set(ui_nodes) == set(doc["prompt"]), "regenerate benchmarks/sd15_16k_api.json"
    for nid, n in ui_nodes.items():
        api = doc["prompt"][nid]
        assert api["class_type"] == n["type"]
        w = n.get("widgets_values") or []
        if n["type"] == "EmptyLatentImage":
            assert [api["inputs"]["width"], api["inputs"]["height"]] == w[:2]
        if n["type"] == "ImageScale":
            assert [api["inputs"]["width"], api["inputs"]["height"]] == w[1:3]
        if n["type"] == "KSampler":
            assert [api["inputs"]["steps"], api["inputs"]["denoise"]] == [w[2], w[6]]
    titles = {g["title"] for g in ui["groups"]}
    assert {t for t in doc["stages"].values() if t} <= titles


def test_device_command_fits():
    cmd = gpu_prepare.RUN_COMMAND.format(budget=480)
    assert len(cmd) <= 2000
    assert "--out-dir $OUT" in cmd and ".gpu-carry/wheels/*.whl" in cmd
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu-carry/x"], cwd=REPO).returncode
    assert ignored == 0, ".gpu-carry/ must be ignored by git (it holds ComfyUI and wheels for the GPU machine)"
    assert not {"torch", "triton", "torchvision"} & set(gpu_prepare.CARRY)  # never carried
    assert not {gpu_prepare.norm(n) for n in gpu_prepare.CARRY} & gpu_prepare.GPU_IMAGE


def test_section_killed_at_its_limit_keeps_what_it_recorded(tmp_path):
    """The parent's hard time guard: a section past its limit is asked for its stacks and killed; what it wrote
    so far is kept, and the progress callback saw it while it ran."""
    part = tmp_path / "part-x.json"
    part.write_text(json.dumps({"section": "x", "status": "running", "rows": [{"a": 1}], "notes": [],
                                "skipped": []}))
    child = gpu_check.Child.__new__(gpu_check.Child)
    child.section, child.out, child._log, child.killed, child.t0 = "x", part, None, None, time.time()
    child.proc = subprocess.Popen([sys.executable, "-c", "import faulthandler, signal, time; "
                                   "faulthandler.register(signal.SIGUSR1); time.sleep(60)"],
                                  start_new_session=True)
    ticks = []
    data = child.wait(time.time() + 2.0, tick=ticks.append, every=0.5)
    assert child.proc.poll() is not None
    assert data["status"] == "killed" and "time limit" in data["killed"] and data["rows"] == [{"a": 1}]
    assert ticks and ticks[0]["rows"] == [{"a": 1}]


def test_partial_report_then_named_files(tmp_path):
    import argparse
    args = argparse.Namespace(out_dir=tmp_path, tag="", dry=False)
    report = {"mode": "GPU", "date": "d", "budget_s": 480, "config": {"chain": {"steps": 2, "stages": 5,
                                                                                "scale": 1.0}},
              "notes": [], "sections": {"attention": {"status": "done", "env": {"device": "NVIDIA H100 80GB HBM3"},
                                                      "rows": [], "skipped": [], "notes": []}}}
    gpu_check.write_report(report, args, time.time())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check_partial.json", "gpu_check_partial.md"]
    assert json.loads((tmp_path / "gpu_check_partial.json").read_text())["complete"] is False
    gpu_check.write_report(report, args, time.time(), final=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check_NVIDIA-H100-80GB-HBM3.json",
                                                          "gpu_check_NVIDIA-H100-80GB-HBM3.md"]


# --------------------------------------------------------------------------------------------- the dry run
def _has_dynamic_vram(comfyui: str) -> bool:
    try:
        return "enables_dynamic_vram" in (Path(comfyui) / "comfy" / "cli_args.py").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def dry(host, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check_dry")
    out = work / "out"
    cmd = [host["python"], str(REPO / "benchmarks" / "gpu_check.py"), "--dry", "--comfyui", host["comfyui"],
           "--work", str(work), "--out-dir", str(out)]
    if _has_dynamic_vram(host["comfyui"]):
        cmd.append("--emulate-gpu-image")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t = time.time()
    # Its sections die with it (PR_SET_PDEATHSIG) if the timeout kills it.
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1700, cwd=str(REPO))
    seconds = time.time() - t
    print(f"gpu_check --dry: {seconds:.0f} s ({' '.join(cmd[2:])})")
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-4000:])
    path = out / "gpu_check_cpu-dry-run.json"

    def no_nan(x):
        raise ValueError(f"non-finite number {x} in the JSON")
    report = json.loads(path.read_text(), parse_constant=no_nan)
    assert (out / "gpu_check_cpu-dry-run.md").read_text().startswith("# LinFusion GPU check")
    report["_stdout"] = res.stdout
    report["_out"] = str(out)
    return report


def _finite_numbers(rows: list) -> None:
    """Every number in the rows is finite (the JSON writer turns a NaN or inf into a string)."""
    def walk(x, where):
        if isinstance(x, float):
            assert math.isfinite(x), where
        elif isinstance(x, str):
            assert x.lower() not in ("nan", "inf", "-inf"), where
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != "traceback":
                    walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
    walk(rows, "rows")


def _tolerance(dtype: str) -> float:
    import torch
    eps = torch.finfo(getattr(torch, dtype)).eps
    return 100 * eps if dtype == "float32" else 8 * eps  # fp32 sums; one 16-bit rounding of the output + tf32


def test_dry_run_mode_and_sections(dry):
    assert dry["mode"] == "CPU dry run" and any("CPU DRY RUN" in n for n in dry["notes"])
    for name in ("prepare", "attention", "unet", "parallel", "vae", "chain"):
        assert dry["sections"][name]["status"] == "done", (name, dry["sections"][name].get("error"),
                                                          dry["sections"][name].get("traceback"))


def test_dry_attention_against_the_fp64_reference(dry):
    sec = dry["sections"]["attention"]
    cfg = dry["config"]["attention"]
    rows = sec["rows"]
    _finite_numbers(rows)
    assert not [r for r in rows if "error" in r], [r.get("traceback") for r in rows if "error" in r]
    triton_ran = any(r["impl"] == "triton" for r in rows)
    if not triton_ran:  # only acceptable with the reason recorded
        assert any(s["what"].startswith("triton") for s in sec["skipped"]), sec["skipped"]
    impls = [i for i in cfg["impls"] if i != "triton" or triton_ran]
    got = {(r["tokens"], r["dtype"], r["impl"]) for r in rows}
    assert got == {(n, d, i) for n in cfg["tokens"] for d in cfg["dtypes"] for i in impls}
    for r in rows:
        tol = _tolerance(r["dtype"])
        assert r["finite"] and r["out_dtype"] == r["dtype"], r
        assert r["error_reference"] == "fp64" and r["rel_err"] < tol, r
        if r["impl"] == "triton":
            assert r["rel_diff_vs_torch"] < 2 * tol, r
        assert r["seconds"] > 0 and r["bytes_per_s"] > 0 and r["reps"] >= 1, r
        assert r["bytes"] == 4 * r["batch"] * r["tokens"] * r["channels"] * (4 if r["dtype"] == "float32" else 2)
        assert r["hbm_fraction"] is None  # no HBM peak on a CPU
    assert sec["env"]["peak_bandwidth"] is None and "CPU" in sec["env"]["peak_bandwidth_assumption"]


def test_dry_unet_step(dry):
    sec = dry["sections"]["unet"]
    rows = sec["rows"]
    _finite_numbers(rows)
    assert {r["config"] for r in rows} == set(dry["config"]["unet"]["configs"])
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["finite"] and r["seconds"] > 0 and r["reps"] == 1, r
        assert isinstance(r["peak_bytes"], int) and r["comfy_formula_bytes"] > 0, r
    lf = next(r for r in rows if r["config"] == "linfusion")
    assert lf["attention_impl"] == "torch"  # CPU tensors never take the Triton path
    assert lf["estimate_bytes"] != lf["comfy_formula_bytes"]  # the pack's memory estimate is installed


def test_dry_chain_through_the_executor(dry):
    sec = dry["sections"]["chain"]
    assert sec["run_status"] == "success", (sec.get("error"), sec.get("traceback"))
    assert sec["env"]["dynamic_vram"] is False and sec["env"]["model_management"].startswith("classic")
    _finite_numbers(sec["nodes"])
    types = [n["class_type"] for n in sec["nodes"]]
    for ct in ("CheckpointLoaderSimple", "LinFusionLoader", "ApplyLinFusion", "VAEEncode", "PreviewImage"):
        assert ct in types, types
    assert types.count("KSampler") == dry["config"]["chain"]["stages"]
    stages = {s["stage"]: s for s in sec["stages"]}
    assert len([s for s in stages if s.startswith("Stage ")]) == dry["config"]["chain"]["stages"]
    for title, s in stages.items():
        assert s["seconds"] > 0 and s["rss_peak"] > 0, s
        if title.startswith("Stage "):
            steps = s["sampler"]["step_seconds"]
            assert len(steps) == dry["config"]["chain"]["steps"] and all(x > 0 for x in steps), s
    assert [s["size"] for t, s in sorted(stages.items()) if t.startswith("Stage ")] == [[64, 32], [128, 64]]
    if "emulated_gpu_image_blocked" in sec:  # ComfyUI 0.33+: ran with only what the GPU machine will have
        assert "emulate" in " ".join(dry["notes"])


def test_dry_lowmem_rows(dry):
    """The low-memory rows (issue 13; benchmarks/gpu_lowmem.py): one step without and one with the mode, at the
    dry run's size on the SD-1.5 stand-in (on a GPU: the SD-XL 16K stage)."""
    sec = dry["sections"]["lowmem"]
    assert sec["status"] == "done", (sec.get("error"), sec.get("traceback"))
    rows = sec["rows"]
    _finite_numbers(rows)
    assert [r["low_memory"] for r in rows] == dry["config"]["lowmem"]["modes"] == ["off", "on"]
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["finite"] and r["seconds"] > 0 and isinstance(r["peak_bytes"], int) and r["weights_bytes"] > 0, r
        # where the step peaked, probed after every layer the UNet calls: SD-1.5 has 18 in its input blocks, 3 in
        # the middle block, 24 in its output blocks, and out
        assert r["layers_probed"] == 18 + 3 + 24 + 1, r["layers_probed"]
        assert r["peak_layer"] == "out" or r["peak_layer"].split(".")[0] in ("input_blocks", "middle_block",
                                                                             "output_blocks"), r["peak_layer"]
        assert 0 <= r["peak_layer_bytes"] <= r["peak_bytes"] + (1 << 20), r
    on = rows[1]
    assert on["estimate_on_bytes"] <= on["estimate_off_bytes"]
    # the mode's output against the step's without it, the same inputs (fp32 on this CPU: the test suite's bound)
    assert "relative_to_off" not in rows[0] and 0 <= on["relative_to_off"] <= 1e-6, on.get("relative_to_off")
    md = "\n".join(gpu_check.gpu_lowmem.markdown(sec, gpu_check._gib))
    print(md)
    assert "Low-memory mode" in md and md.count("| sd15 |") == 2 and md.count("running peak last rose in") == 2
    assert md.count("relative to the same step without the mode") == 1


def test_dry_parallel_rows(dry):
    """The spatial-parallel rows (issue 14; benchmarks/gpu_parallel.py): the parallel path on one rank against the
    plain UNet call, timed, with the same output (a rank of one exchanges nothing; its halos are zero padding)."""
    sec = dry["sections"]["parallel"]
    assert sec["status"] == "done", (sec.get("error"), sec.get("traceback"))
    rows = sec["rows"]
    _finite_numbers(rows)
    assert [r["size"] for r in rows] == dry["config"]["parallel"]["sizes"]
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["plain"]["seconds"] > 0 and r["parallel_1rank"]["seconds"] > 0, r
        assert r["max_rel_diff"] < 1e-5, r
    md = "\n".join(gpu_check.gpu_parallel.markdown(sec, gpu_check._gib))
    assert "one-rank overhead" in md and md.count("| 64×64 |") == len(rows)


def test_dry_vae_rows(dry):
    """The 16K tiled-decode rows at the dry size: both VAEs, ours and ComfyUI's, timed, with peak memory and the
    distance between the two (small: they differ only in GroupNorm statistics and the attention's tiling)."""
    sec = dry["sections"]["vae"]
    cfg = dry["config"]["vae"]
    rows = [r for r in sec["rows"] if "error" not in r]
    assert {(r["arch"], r["impl"]) for r in rows} == {(a, i) for a in cfg["archs"] for i in cfg["impls"]}, sec
    _finite_numbers(sec["rows"])
    for r in rows:
        assert r["seconds"] > 0 and r["finite"] and r["dtype"] == cfg["dtype"] and "peak_rss_bytes" in r
        if r["impl"] == "linfusion":
            assert r["kept_bytes"] > 0
        else:
            assert 0 < r["dist_to_linfusion"]["mean"] < 0.2
    assert "## Tiled VAE decode" in (Path(dry["_out"]) / "gpu_check_cpu-dry-run.md").read_text()


def test_vae_skip_rule():
    assert gpu_check.vae_skip_reason(None, 10) is None
    assert "time is spent" in gpu_check.vae_skip_reason(None, 0)
    assert "previous row" in gpu_check.vae_skip_reason(10.0, 12)
    assert gpu_check.vae_skip_reason(10.0, 14) is None
