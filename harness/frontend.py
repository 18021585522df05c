"""The real ComfyUI frontend (the one the host serves) driven in headless Chromium through Playwright.

What it is used for:
  * converting a UI-format workflow (what the frontend saves, what users drag in) into an API prompt, with
    the frontend's own ``app.loadGraphData`` + ``app.graphToPrompt`` (``Frontend.to_api``, ``Frontend.load``);
  * loading a workflow as a user does, a file dropped on the canvas, and reporting everything the user is
    shown meanwhile: toasts (the schema check's "Invalid workflow" alert is one), dialogs, alert(), console
    errors, frontend 1.4x's error overlay and what its stores say it is about (``Frontend.drop``); judged by
    ``load_problems``, which lets through only the marks of model/input files that are not installed;
  * building the bundled workflows: the graph is assembled by the frontend itself (``LiteGraph.createNode``,
    widgets set by name, ``connect``) and saved by its own Export command, so the files are exactly what it
    writes (``Frontend.build``, used by harness/build_workflows.py).

Works with frontend 1.32.9 (ComfyUI 0.3.75) and 1.49.6 (ComfyUI 0.33.0).

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
    // the widgets a save writes (not the frontend's own, e.g. 1.49.6's image preview '$$canvas-image-preview')
    widgets: (n.widgets || []).filter(w => w.serialize !== false).map(w => [w.name, w.value]),
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
    if (g.font_size) grp.font_size = g.font_size;
    app.graph.add(grp);
  }
  // The view a user gets on opening the file (the frontend stores the canvas view in extra.ds on export).
  if (spec.view) { app.canvas.ds.scale = spec.view.scale; app.canvas.ds.offset = [...spec.view.offset]; }
  app.graph.setDirtyCanvas(true, true);
  return problems;
}"""

# Installed once per page, before the app starts: every toast and dialog that appears in the DOM is recorded
# (what the user sees, whichever code path raised it), and so are console.error calls and uncaught errors.
_WATCH_JS = """() => {
  window.__lfEvents = [];
  const push = (kind, data) => window.__lfEvents.push({kind, t: Date.now(), ...data});
  window.__lfErrors = [];
  const orig = console.error.bind(console);
  console.error = (...a) => {
    const text = a.map(x => String(x && x.stack || x)).join(' ');
    window.__lfErrors.push(text); push('console', {text}); orig(...a);
  };
  window.addEventListener('error', e => { window.__lfErrors.push('error: ' + e.message); });
  window.addEventListener('unhandledrejection', e => { window.__lfErrors.push('rejection: ' + e.reason); });
  const dialogTitle = (el) => (el.querySelector('.p-dialog-title, .p-dialog-header, h1, h2, h3') || el)
    .innerText.trim().slice(0, 200);
  window.__lfDialogTitle = dialogTitle;
  const seen = new WeakSet();
  const scan = (root) => {
    if (!(root instanceof Element)) return;
    const all = [root, ...root.querySelectorAll('.p-toast-message, .p-dialog, [role=dialog], [role=alertdialog], '
                                                + '[data-testid=error-overlay]')];
    for (const el of all) {
      if (seen.has(el)) continue;
      if (el.matches('[data-testid=error-overlay]')) {
        // frontend 1.4x's error overlay (missing nodes/models/media, validation errors), top right
        seen.add(el);
        requestAnimationFrame(() => push('overlay', {text: el.innerText.trim()}));
      } else if (el.matches('.p-toast-message')) {
        seen.add(el);
        const sev = ([...el.classList].find(c => /^p-toast-message-(success|info|warn|error|secondary|contrast)$/
          .test(c)) || '').replace('p-toast-message-', '');
        // the text is rendered with the element; read it on the next frame to be sure
        requestAnimationFrame(() => push('toast', {severity: sev, text: el.innerText.trim()}));
      } else if (el.matches('.p-dialog, [role=dialog], [role=alertdialog]')) {
        seen.add(el);
        requestAnimationFrame(() => push('dialog', {
          title: dialogTitle(el),
          text: el.innerText.trim().slice(0, 2000), classes: el.className}));
      }
    }
  };
  new MutationObserver(ms => { for (const m of ms) for (const n of m.addedNodes) scan(n); })
    .observe(document, {childList: true, subtree: true});
}"""

_DROP_JS = """async ([text, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  const el = document.querySelector('#graph-canvas') || document.querySelector('canvas') || document.body;
  const r = el.getBoundingClientRect();
  const at = {clientX: r.left + r.width / 2, clientY: r.top + r.height / 2};
  for (const type of ['dragenter', 'dragover', 'drop'])
    el.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true, ...at}));
}"""

_UNBLOCKED_JS = ("() => !(app.extensionManager && app.extensionManager.spinner) "
                 "&& !document.querySelector('.p-blockui-mask')")

_STATE_JS = """() => {
  const app = window.app;
  const open = [...document.querySelectorAll('.p-dialog, [role=dialog], [role=alertdialog]')]
    .filter(el => el.offsetParent !== null || el.getClientRects().length)
    .map(el => window.__lfDialogTitle(el));
  return {
    nodes: app.graph.nodes.map(n => ({
      id: n.id, type: n.type, title: n.title, has_errors: !!n.has_errors,
      registered: !!LiteGraph.registered_node_types[n.type],
      widgets: (n.widgets || []).filter(w => w.serialize !== false)  // what a save writes
        .map(w => [w.name, w.value === undefined ? null : w.value]),
    })),
    groups: app.graph.groups.map(g => g.title),
    links: [...(app.graph.links instanceof Map ? app.graph.links.values() : Object.values(app.graph.links || {}))]
      .filter(Boolean).length,
    open_dialogs: open,
    toasts_open: document.querySelectorAll('.p-toast-message').length,
    overlay: (() => { const el = document.querySelector('[data-testid=error-overlay]');
                      return el ? el.innerText.trim() : null; })(),
    spinner: !!(app.extensionManager && app.extensionManager.spinner),
    // What frontend 1.4x's error overlay and node marks are made of (its Pinia stores; absent in 1.32.9).
    missing: (() => {
      const el = document.querySelector('#vue-app');
      const pinia = el && el.__vue_app__ && el.__vue_app__.config.globalProperties.$pinia;
      const st = (id) => pinia && pinia._s.get(id);
      const cand = (c) => ({node_id: String(c.nodeId), node_type: c.nodeType, widget: c.widgetName, name: c.name,
                            directory: c.directory || null,
                            is_missing: c.isMissing === undefined ? null : c.isMissing});
      const plain = (x) => JSON.parse(JSON.stringify(x === undefined ? null : x));
      const err = st('executionError');
      return {
        models: ((st('missingModel') || {}).missingModelCandidates || []).map(cand),
        media: ((st('missingMedia') || {}).missingMediaCandidates || []).map(cand),
        node_types: plain(((st('missingNodesError') || {}).missingNodesError || {}).nodeTypes || []),
        node_errors: err ? plain(err.lastNodeErrors) : null,
        execution_error: err ? plain(err.lastExecutionError) : null,
        prompt_error: err ? plain(err.lastPromptError) : null,
        overlay_open: !!(err && err.isErrorOverlayOpen),
      };
    })(),
  };
}"""


def classify_console_error(text: str, url: str | None, server_url: str, input_files: set) -> str:
    """'error', or why a console error is not one:
    'offline': a resource outside the ComfyUI server failed to load (these machines have no network; the
    frontend asks api.comfy.org for release notes and node metadata);
    'missing-input': the image preview of a LoadImage whose file is not in input/ (404 from /api/view) - the
    same kind of thing as a checkpoint that is not installed: the user supplies it."""
    if text.startswith("Failed to load resource") and url:
        from urllib.parse import parse_qs, urlparse
        u, s = urlparse(url), urlparse(server_url)
        if u.netloc and u.netloc != s.netloc:
            return "offline"
        q = parse_qs(u.query)
        if u.path.endswith("/view") and q.get("type") == ["input"] and q.get("filename", [""])[0] in input_files:
            return "missing-input"
    return "error"


class Frontend:
    """``with Frontend(server_url) as fe: api = fe.to_api(workflow)``.

    ``fe.drop(workflow, name)`` loads a workflow the way a user does (a file dropped on the canvas: the frontend
    reads it, validates it against its schema, checks node types and models, configures the graph) and reports
    everything the user is shown while it loads: toasts, dialogs, native alerts, console errors."""

    def __init__(self, url: str, timeout_ms: int = 120_000, viewport: tuple[int, int] = (1600, 900)):
        self.url = url
        self.timeout_ms = timeout_ms
        self.viewport = viewport
        self._pw = self._browser = self.page = None
        self.console: list = []        # (type, text, url) of every console message since the page opened
        self.native_dialogs: list = []  # (type, message) of alert()/confirm()/prompt() (dismissed)
        self.failed_requests: list = []  # (status or failure, url)

    def __enter__(self) -> "Frontend":
        from playwright.sync_api import sync_playwright
        exe = chromium_path()
        if not exe:
            raise RuntimeError("no chromium found (set LINFUSION_CHROMIUM or install Debian's chromium)")
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]},
                                               accept_downloads=True)
            self.page.set_default_timeout(self.timeout_ms)
            self.page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url"))))
            self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e), None)))
            self.page.on("dialog", self._on_native_dialog)
            self.page.on("requestfailed", lambda r: self.failed_requests.append((r.failure, r.url)))
            self.page.on("response", lambda r: r.status >= 400 and self.failed_requests.append((r.status, r.url)))
            self.page.add_init_script(script=f"({_WATCH_JS})()")
            self.page.goto(self.url)
            self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph "
                                        "&& Object.keys(LiteGraph.registered_node_types).length > 100")
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

    def _on_native_dialog(self, d) -> None:
        self.native_dialogs.append((d.type, d.message))
        d.dismiss()

    @property
    def version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")

    def setting(self, key: str, value=...):
        """Read a frontend setting, or set it (as the Settings dialog does; the server stores it in the base
        directory's user settings) and return the previous value."""
        old = self.page.evaluate("(k) => app.extensionManager.setting.get(k)", key)
        if value is not ...:
            self.page.evaluate("async ([k, v]) => await app.extensionManager.setting.set(k, v)", [key, value])
        return old

    # ------------------------------------------------------------------------------------------ as a user
    def close_dialogs(self, tries: int = 5) -> list:
        """Close what is open, as a user would: toasts and frontend 1.4x's error overlay with their close
        buttons, dialogs (the template browser a new user gets on first start, the missing-nodes dialog, ...)
        with Escape. Returns the titles of the dialogs that were open (and the overlay's text)."""
        closed = []
        for _ in range(tries):
            self.page.wait_for_timeout(300)
            state = self.page.evaluate(_STATE_JS)
            if not state["open_dialogs"] and not state["overlay"] and not state["toasts_open"]:
                break
            # clicked in the page: a toast may lie over the overlay's close button
            self.page.evaluate("""() => document.querySelectorAll(
              '.p-toast-close-button, [data-testid=error-overlay-dismiss]').forEach(b => b.click())""")
            if state["overlay"]:
                closed.append(state["overlay"])
            if state["open_dialogs"]:
                closed += state["open_dialogs"]
                self.page.keyboard.press("Escape")
                # dialogs that Escape leaves open (frontend 1.32.9's template browser): their close button
                self.page.evaluate("""() => document.querySelectorAll('.p-dialog').forEach(d => {
                  const b = d.querySelector('.p-dialog-close-button, .p-dialog-header-close, button[aria-label=Close]')
                    || [...d.querySelectorAll('button')].find(x => x.querySelector('.pi-times'));
                  if (b) b.click(); })""")
        return closed

    def drop(self, workflow: dict | str, name: str = "workflow.json", settle_ms: int = 2500) -> dict:
        """Drop ``workflow`` (a dict, or the file's text) on the canvas as a file named ``name`` and wait until
        the frontend has loaded it. Returns what appeared after the drop: toasts [{severity, text}], dialogs
        [{title, text}], overlays [text], native_dialogs [(type, message)], console_errors [text] (and
        console_other: failures that are not errors, see classify_console_error); and the state after it:
        nodes [{id, type, title, has_errors, registered, widgets}], groups, links, open_dialogs, overlay,
        missing (frontend 1.4x's missing models/media/node types and node errors; empty lists in 1.32.9)."""
        text = workflow if isinstance(workflow, str) else json.dumps(workflow)
        want = json.loads(text)
        # the full-screen block (PrimeVue BlockUI, shown while a file loads) is gone: a drop during its exit
        # animation trips a PrimeVue race (removeMask on a mask already replaced) that logs an error
        self.page.wait_for_function(_UNBLOCKED_JS)
        n_events = self.page.evaluate("() => window.__lfEvents.length")
        n_console, n_native = len(self.console), len(self.native_dialogs)
        self.page.evaluate(_DROP_JS, [text, name])
        ids = sorted(str(n["id"]) for n in want.get("nodes", []))
        stem = name.rsplit(".", 1)[0]
        # loaded: the new tab (named after the file) is active and holds the file's nodes
        self.page.wait_for_function("""([ids, stem]) => {
          const ws = app.extensionManager, wf = ws && ws.workflow && ws.workflow.activeWorkflow;
          return wf && wf.filename === stem &&
                 JSON.stringify(app.graph.nodes.map(n => String(n.id)).sort()) === JSON.stringify(ids);
        }""", arg=[ids, stem])
        # toasts and the missing-nodes/models dialogs come after configure(); give them time to show
        self.page.wait_for_timeout(settle_ms)
        self.page.wait_for_function(_UNBLOCKED_JS)
        events = self.page.evaluate("(n) => window.__lfEvents.slice(n)", n_events)
        state = self.page.evaluate(_STATE_JS)
        inputs = {v for n in want.get("nodes", []) if n.get("type") == "LoadImage"
                  for v in (n.get("widgets_values") or [])[:1] if isinstance(v, str)}
        console = [(classify_console_error(t, u, self.url, inputs), t if not u else f"{t} ({u})")
                   for kind, t, u in self.console[n_console:] if kind in ("error", "pageerror")]
        return {
            "toasts": [{"severity": e["severity"], "text": e["text"]} for e in events if e["kind"] == "toast"],
            "dialogs": [{"title": e["title"], "text": e["text"]} for e in events if e["kind"] == "dialog"],
            "overlays": [e["text"] for e in events if e["kind"] == "overlay"],
            "native_dialogs": self.native_dialogs[n_native:],
            "console_errors": [t for c, t in console if c == "error"],
            "console_other": [f"{c}: {t}" for c, t in console if c != "error"],
            **state,
        }

    def screenshot(self, path) -> None:
        self.page.screenshot(path=str(path))

    # ------------------------------------------------------------------------------------------ programmatic
    def load(self, workflow: dict) -> dict:
        """Load a UI-format workflow; returns {unregistered, nodes: [{id,type,has_errors,registered,widgets}],
        errors: [console errors raised while loading]}."""
        return self.page.evaluate(_LOAD_JS, workflow)

    def to_api(self, workflow: dict) -> dict:
        """The API prompt the frontend itself queues for this workflow (``graphToPrompt().output``)."""
        self.load(workflow)
        return json.loads(self.page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)"))

    def build(self, spec: dict, name: str = "workflow") -> str:
        """Assemble a graph in the frontend from ``spec`` ({nodes: [{key,type,pos,size?,title?,widgets,inputs:
        {name: [src_key, slot]}}], groups: [...], view?: {scale, offset}}) and return the text of the file the
        frontend's own Export command (Workflow > Export) downloads for it.

        The text is the download's, unchanged: nothing passes through page.evaluate, which returns every property
        the frontend left ``undefined`` as ``None`` (a JSON dump of that writes ``null`` where the frontend's
        schema wants the key absent)."""
        problems = self.page.evaluate(_BUILD_JS, spec)
        if problems:
            raise ValueError("; ".join(problems))
        with self.page.expect_download() as dl:
            # not awaited: the command waits for the file name prompt answered below
            self.page.evaluate("() => { app.extensionManager.command.execute('Comfy.ExportWorkflow'); }")
            self._answer_filename_prompt(name)
        with open(dl.value.path(), encoding="utf-8") as f:
            return f.read()

    def _answer_filename_prompt(self, name: str) -> None:
        """Export asks for a file name when Comfy.PromptFilename is on (the default): type it, press Enter."""
        box = self.page.locator(".p-dialog input:not([type]), .p-dialog input[type=text], "
                                "[role=dialog] input:not([type]), [role=dialog] input[type=text]").first
        try:
            box.wait_for(state="visible", timeout=5000)
        except Exception:
            return  # no prompt: the setting is off
        box.fill(name)
        box.press("Enter")


def combo_options(object_info: dict, node_type: str, input_name: str) -> list | None:
    """The choices the server offers for a combo input (both object_info spellings: [[...], {}] and
    ["COMBO", {"options": [...]}]), or None if it is not a combo."""
    spec = object_info.get(node_type, {}).get("input", {})
    entry = {**spec.get("required", {}), **spec.get("optional", {})}.get(input_name)
    if not entry:
        return None
    if isinstance(entry[0], list):
        return entry[0]
    if entry[0] == "COMBO" and len(entry) > 1 and isinstance(entry[1], dict):
        return entry[1].get("options")
    return None


def load_problems(report: dict, workflow: dict, object_info: dict) -> list[str]:
    """Everything wrong with a ``Frontend.drop`` report, as messages (empty: the workflow loaded cleanly).

    Fine: a loader whose file is not installed (a checkpoint, ControlNet, or the LoadImage input the user
    supplies). Frontend 1.4x marks such nodes and says so in its error overlay; each mark must name a file the
    workflow asks for that the server does not list. Everything else is a problem: any toast (the schema check's
    "Alert", link fixes, drop errors), any dialog (missing nodes, load errors), alert(), console errors, missing
    or unregistered node types, node errors, widgets that did not keep their stored values."""
    problems = []
    for t in report["toasts"]:
        problems.append(f"toast ({t['severity']}): {t['text'][:1500]}")
    for d in report["dialogs"]:
        problems.append(f"dialog: {d['title']}: {d['text'][:500]}")
    for kind, msg in report["native_dialogs"]:
        problems.append(f"{kind}(): {msg[:500]}")
    for e in report["console_errors"]:
        problems.append(f"console error: {e[:1500]}")
    miss = report.get("missing") or {}
    for key, what in (("node_types", "missing node types"), ("node_errors", "node errors"),
                      ("execution_error", "execution error"), ("prompt_error", "prompt error")):
        if miss.get(key):
            problems.append(f"{what}: {json.dumps(miss[key])[:1500]}")
    stored = {str(n["id"]): n for n in workflow["nodes"]}
    marked = set()
    for c in list(miss.get("models") or []) + list(miss.get("media") or []):
        node = stored.get(c["node_id"])
        if node is None:
            problems.append(f"missing-file mark on a node the workflow does not have: {c}")
            continue
        offered = combo_options(object_info, node["type"], c["widget"])
        if c["name"] not in (node.get("widgets_values") or []):
            problems.append(f"missing-file mark for a file the workflow does not name: {c}")
        elif offered is not None and c["name"] in offered:
            problems.append(f"missing-file mark for a file the server has: {c}")
        else:
            marked.add(c["node_id"])
    overlays = [t for t in [*report.get("overlays", []), report.get("overlay")] if t]
    if overlays and not (miss.get("models") or miss.get("media")):
        problems.append(f"error overlay without a missing-file cause: {overlays[0][:500]}")
    nodes = report["nodes"]
    if sorted(str(n["id"]) for n in nodes) != sorted(stored):
        problems.append(f"node ids {sorted(str(n['id']) for n in nodes)} != stored {sorted(stored)}")
    for n in nodes:
        s = stored.get(str(n["id"]))
        if not n["registered"] or (s and n["type"] != s["type"]):
            problems.append(f"node {n['id']}: type {n['type']} not registered (stored {s and s['type']})")
        if n["has_errors"] and str(n["id"]) not in marked:
            problems.append(f"node {n['id']} ({n['type']}) is marked with errors")
        if s is not None and [v for _, v in n["widgets"]] != s.get("widgets_values", []):
            problems.append(f"node {n['id']} ({n['type']}): widgets {n['widgets']} != stored {s.get('widgets_values')}")
    if report["groups"] != [g["title"] for g in workflow.get("groups", [])]:
        problems.append(f"groups {report['groups']} != stored")
    if report["links"] != len(workflow.get("links", [])):
        problems.append(f"{report['links']} links != stored {len(workflow.get('links', []))}")
    return problems


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
