"""The README's picture: a bundled workflow as a user sees it in the real frontend, right after dropping the file on
the canvas and closing the template browser a new user gets on first start.

    LINFUSION_HOST_DIR=.host .host/venv/bin/python -m harness.readme_picture [workflow stem] [out.png]
"""
from __future__ import annotations

import sys
from pathlib import Path

from .frontend import Frontend
from .host import default_server

REPO = Path(__file__).resolve().parent.parent


def main(stem: str = "linfusion_sd15_16k", out: str = "docs/images/workflow_sd15_16k.png") -> Path:
    text = (REPO / "workflows" / f"{stem}.json").read_text()
    path = REPO / out
    path.parent.mkdir(parents=True, exist_ok=True)
    srv = default_server()
    srv.start()
    try:
        with Frontend(srv.url, viewport=(1600, 900)) as fe:
            fe.close_dialogs()
            report = fe.drop(text, f"{stem}.json")
            fe.close_dialogs()
            fe.page.wait_for_timeout(1000)
            fe.screenshot(path)
            print(f"{path} (frontend {fe.version}; {len(report.get('nodes', []))} nodes; shown on load: "
                  f"toasts {report.get('toasts')}, dialogs {report.get('dialogs')})")
    finally:
        srv.stop()
    return path


if __name__ == "__main__":
    main(*sys.argv[1:])
