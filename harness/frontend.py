"""The real ComfyUI frontend (the one the host serves) driven in headless Chromium through Playwright.

What it is used for:
  * converting a UI-format workflow (what the frontend saves, what users drag in) into an API prompt, with
    the frontend's own ``app.loadGraphData`` + ``app.graphToPrompt`` (``Frontend.to_api``);
  * checking that a workflow loads cleanly: every node type registered, no placeholder (missing) nodes,
    widget values that fit, no console errors while loading (``Frontend.load``);
  * building the bundled workflows: the graph is assembled by the frontend itself (``LiteGraph.createNode``,
    widgets set by name, ``connect``) and serialized by it, so the files are in exactly the format it writes
    (``Frontend.build``, used by workflows/build.py).

Chromium: ``LINFUSION_CHROMIUM`` (set by dev.py after harness.env.ensure_chromium), else ``chromium`` on PATH.
No browser is ever downloaded.
"""
from __future__ import annotations

import json
import os
import shutil

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return os.environ.get("LINFUSION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


_LOAD_JS = """async (wf) => {
  const app = window.app;
  const before = window.__lfErrors.length;
  const types = [...new Set(wf.nodes.map(n => n.type))];
  const unregistered = types.filter(t => !LiteGraph.registered_node_types[t]);
  await app.loadGraphData(structuredClone(wf), true, true, null, {showMissingNodesDialog: false,
                                                                 showMissingModelsDialog: false});
  const nodes = app.graph.nodes.map(n => ({
    id: n.id, type: n.type, has_errors: !!n.has_errors,
    registered: !!LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => [w.name, w.value]),
  }));
  return {unregistered, nodes, errors: window.__lfErrors.slice(before)};
}"""

_BUILD_JS = """async (spec) => {
  const app = window.app;
  app.graph.clear();
  const made = {};
  const problems = [];
  for (const s of spec.nodes) {
    const n = LiteGraph.createNode(s.type);
    if (!n) { problems.push(`unknown node type ${s.type}`); continue; }
    if (s.title) n.title = s.title;
    n.pos = s.pos;
    app.graph.add(n);
    if (s.size) n.size = s.size;
    if (s.color) n.color = s.color;
    if (s.bgcolor) n.bgcolor = s.bgcolor;
    for (const [name, value] of Object.entries(s.widgets || {})) {
      const w = (n.widgets || []).find(w => w.name === name);
      if (!w) { problems.push(`${s.type}: no widget ${name}`); continue; }
      w.value = value;
    }
    made[s.key] = n;
  }
  for (const s of spec.nodes) {
    for (const [name, [src, slot]] of Object.entries(s.inputs || {})) {
      const dst = made[s.key], from = made[src];
      const idx = dst.findInputSlot(name);
      if (idx < 0) { problems.push(`${s.type}: no input ${name}`); continue; }
      if (!from.connect(slot, dst, idx)) problems.push(`${s.type}.${name}: connect failed`);
    }
  }
  for (const g of spec.groups || []) {
    const grp = new LiteGraph.LGraphGroup(g.title);
    grp.pos = g.pos; grp.size = g.size;
    if (g.color) grp.color = g.color;
    app.graph.add(grp);
  }
  app.graph.setDirtyCanvas(true, true);
  return {problems, workflow: app.graph.serialize()};
}"""


class Frontend:
    """``with Frontend(server_url) as fe: api = fe.to_api(workflow)``."""

    def __init__(self, url: str, timeout_ms: int = 120_000):
        self.url = url
        self.timeout_ms = timeout_ms
        self._pw = self._browser = self.page = None
        self.console: list = []

    def __enter__(self) -> "Frontend":
        from playwright.sync_api import sync_playwright
        exe = chromium_path()
        if not exe:
            raise RuntimeError("no chromium found (set LINFUSION_CHROMIUM or install Debian's chromium)")
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            self.page = self._browser.new_page()
            self.page.set_default_timeout(self.timeout_ms)
            self.page.on("console", lambda m: self.console.append((m.type, m.text)))
            self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
            self.page.goto(self.url)
            self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                                        "&& Object.keys(LiteGraph.registered_node_types).length > 100")
            # Errors raised from now on (console.error, uncaught exceptions) are collected per call.
            self.page.evaluate("""() => {
              window.__lfErrors = [];
              const orig = console.error.bind(console);
              console.error = (...a) => { window.__lfErrors.push(a.map(x => String(x && x.stack || x)).join(' ')); orig(...a); };
              window.addEventListener('error', e => window.__lfErrors.push('error: ' + e.message));
              window.addEventListener('unhandledrejection', e => window.__lfErrors.push('rejection: ' + e.reason));
            }""")
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self._browser:
            self._browser.close()
        if self._pw:
            self._pw.stop()
        self._browser = self._pw = None

    @property
    def version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")

    def load(self, workflow: dict) -> dict:
        """Load a UI-format workflow; returns {unregistered, nodes: [{id,type,has_errors,registered,widgets}],
        errors: [console errors raised while loading]}."""
        return self.page.evaluate(_LOAD_JS, workflow)

    def to_api(self, workflow: dict) -> dict:
        """The API prompt the frontend itself queues for this workflow (``graphToPrompt().output``)."""
        self.load(workflow)
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def build(self, spec: dict) -> dict:
        """Assemble a graph in the frontend from ``spec`` ({nodes: [{key,type,pos,size?,title?,widgets,inputs:
        {name: [src_key, slot]}}], groups: [...]}) and return the frontend's serialization of it."""
        res = self.page.evaluate(_BUILD_JS, spec)
        if res["problems"]:
            raise ValueError("; ".join(res["problems"]))
        return res["workflow"]


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
