"""Drive a real ComfyUI: start the server on a free loopback port, submit API-format prompts,
collect their results, stop it by its pid.

The server runs ComfyUI's main.py unmodified (through ``harness/comfy_main.py``, which records the pack's log
records beside the console log), with its working directory, database and log files in the base directory, so
nothing is written into the ComfyUI tree; a tree the harness does not own also gets ``PYTHONDONTWRITEBYTECODE``.

Used by the tests and by the main job; runs inside the harness environment (see harness.env).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_pack(name: str = "LinFusionPack"):
    """This repository imported the way ComfyUI imports a custom node: as a package under ``name``, so its
    relative imports work. ComfyUI's own modules must be importable already (the host path on sys.path)."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def host_info() -> dict:
    """The set-up written by ``dev.py``; if absent (tests started by hand), set up now."""
    path = env.host_dir() / "host.json"
    if path.exists():
        info = json.loads(path.read_text())
        if Path(info["comfyui"]).exists():
            return info
    return env.setup()


class PromptError(RuntimeError):
    """The server refused a prompt, or its execution failed; ``.payload`` holds the server's answer."""

    def __init__(self, message: str, payload: dict | None = None):
        super().__init__(message)
        self.payload = payload or {}


@dataclass
class ComfyServer:
    base_dir: Path
    comfyui: Path
    python: str = sys.executable
    extra_args: list = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready_at: float | None = None  # time.time() when the server first answered: records before it are start-up

    @property
    def records_path(self) -> Path | None:
        return Path(self.log_path).with_suffix(".records.jsonl") if self.log_path else None

    @property
    def db_path(self) -> Path | None:
        return Path(self.log_path).with_suffix(".db") if self.log_path else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 300) -> "ComfyServer":
        self.port = self.port or free_port()
        self.log_path = self.log_path or Path(self.base_dir) / f"comfyui-{self.port}.log"
        self.ready_at = None
        for p in (self.records_path, self.db_path):
            p.unlink(missing_ok=True)
        # Own database per server (the default one sits inside the ComfyUI tree, and 0.33+ locks it, so two
        # servers on one tree would collide).
        cmd = [self.python, str(Path(__file__).resolve().parent / "comfy_main.py"), str(self.records_path),
               str(Path(self.comfyui) / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.db_path}", *self.extra_args]
        child_env = dict(os.environ)
        child_env.pop("PYTHONPATH", None)  # the server sees the pack only as a custom node
        child_env["PYTHONUNBUFFERED"] = "1"  # the log is read while the server runs
        if not env.owns_tree(self.comfyui):
            child_env["PYTHONDONTWRITEBYTECODE"] = "1"
        self._log = open(self.log_path, "w")
        # cwd: the base dir, since newer ComfyUI writes comfyui_detail.log into the working directory.
        self.proc = subprocess.Popen(cmd, cwd=str(self.base_dir), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                self.ready_at = time.time()
                return self
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self.db_path:
            for suffix in ("", ".lock", ".bkp", "-journal", "-wal", "-shm"):
                Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path and Path(self.log_path).exists() else ""

    def log_records(self, min_level: int = logging.NOTSET, startup_only: bool = False) -> list[dict]:
        """The pack's own log records (logger "LinFusion" and its children) so far, as dicts with name, level,
        levelno, created and message; ``startup_only``: those emitted before the server first answered."""
        path = self.records_path
        if not path or not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if rec["levelno"] < min_level:
                continue
            if startup_only and self.ready_at is not None and rec["created"] > self.ready_at:
                continue
            out.append(rec)
        return out

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def alive(self) -> bool:
        try:
            return self.get("/system_stats", timeout=5) is not None
        except Exception:
            return False

    # -- HTTP ------------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                data = json.loads(body)
            except ValueError:
                data = {"error": body}
            raise PromptError(f"POST {path} -> HTTP {e.code}: {body[:2000]}", data) from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1200, on_poll=None) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=60)
            except (socket.timeout, TimeoutError, ConnectionError):
                # A busy server (loading gigabytes on two cores) can be slow to answer; keep waiting.
                hist = {}
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if on_poll:
                on_poll()
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 1200) -> dict:
        """Queue a prompt and wait for it; raise PromptError with the server's own message on failure."""
        pid = self.queue_prompt(prompt)
        entry = self.wait(pid, timeout=timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise PromptError(execution_error(entry) or f"prompt failed: {json.dumps(status)[:2000]}", entry)
        return entry

    def free(self) -> None:
        self.post("/free", {"unload_models": True, "free_memory": True})

    def output_images(self, entry: dict) -> list[Path]:
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                folder = {"output": "output", "temp": "temp", "input": "input"}[img.get("type", "output")]
                files.append(Path(self.base_dir) / folder / img.get("subfolder", "") / img["filename"])
        return files


def execution_error(entry: dict) -> str | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return None


def default_server(extra_args: list | None = None, base_dir: Path | None = None) -> ComfyServer:
    info = host_info()
    return ComfyServer(base_dir=Path(base_dir or info["base"]), comfyui=Path(info["comfyui"]),
                       python=info.get("python") or sys.executable, extra_args=list(extra_args or []))
