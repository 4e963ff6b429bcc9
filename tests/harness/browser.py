"""The real ComfyUI frontend in Debian's headless Chromium, driven by Playwright.

Never downloads a browser: Playwright is pointed at ``/usr/bin/chromium``
(``MPOD3D_CHROMIUM`` overrides). Console errors, page errors and failed HTTP
responses are recorded so a test can compare them against the empty page.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
]

# Text of the frontend's missing-nodes dialog (frontend 1.32.x, English).
MISSING_NODES_DIALOG_TEXT = "missing nodes"


def is_local_url(url: str) -> bool:
    p = urlparse(url)
    return p.scheme not in ("http", "https", "ws", "wss") or p.hostname in ("127.0.0.1", "localhost", "::1")


def is_ignorable(event: "PageEvent") -> str | None:
    """Why an error event does not count against a workflow, or None.

    * requests to other hosts (blocked: no network here, none needed);
    * 404s of ``/api/view`` previews: files a workflow names that exist only
      after it runs (Preview3D's model file, an output image)."""
    if event.url and not is_local_url(event.url):
        return "outside host"
    if "/api/view?" in event.url or "/api/view?" in event.text:
        return "preview of a file that does not exist yet"
    return None


def chromium_path() -> str:
    return os.environ.get("MPOD3D_CHROMIUM", "/usr/bin/chromium")


def browser_unavailable_reason() -> str | None:
    """None when Playwright and Chromium are both there, else why not."""
    if importlib.util.find_spec("playwright") is None:
        return "the python package playwright is not installed (pip install -r requirements-test.txt)"
    exe = chromium_path()
    if not (os.path.isfile(exe) or shutil.which(exe)):
        return f"no Chromium at {exe} (apt-get install chromium, or run `bash scripts/setup.sh --test`)"
    return None


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


@dataclass
class PageEvent:
    kind: str  # "console", "pageerror", "http"
    text: str
    url: str = ""

    def __str__(self) -> str:
        return f"[{self.kind}] {self.text}" + (f" ({self.url})" if self.url and self.url not in self.text else "")


@dataclass
class ComfyPage:
    """A frontend page on a running ComfyServer, with its errors recorded."""

    page: object
    url: str
    events: list = field(default_factory=list)

    @classmethod
    def open(cls, browser, server_url: str, viewport=(1600, 1000), timeout_ms: int = 120_000) -> "ComfyPage":
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self = cls(page=page, url=server_url)
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.events.append(PageEvent("pageerror", str(e))))
        page.on("response", self._on_response)
        # Nothing leaves this machine: requests to other hosts fail at once
        # (the frontend asks api.comfy.org for node metadata, for instance).
        page.route(lambda url: not is_local_url(url), lambda route: route.abort())
        page.goto(server_url)
        page.wait_for_function(
            "() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && document.querySelector('canvas'))", timeout=timeout_ms)
        self.settle()
        return self

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            loc = msg.location or {}
            self.events.append(PageEvent("console", msg.text, loc.get("url", "")))

    def _on_response(self, resp) -> None:
        if resp.status >= 400:
            self.events.append(PageEvent("http", f"HTTP {resp.status} {resp.request.method}", resp.url))

    def settle(self, seconds: float = 1.5) -> None:
        """Let pending requests and animation frames finish."""
        try:
            self.page.wait_for_load_state("networkidle", timeout=int(seconds * 4000))
        except Exception:
            pass
        time.sleep(seconds)

    def mark(self) -> int:
        return len(self.events)

    def errors_since(self, mark: int) -> list[PageEvent]:
        return self.events[mark:]

    @staticmethod
    def _key(e: PageEvent) -> tuple:
        # The first line only: stack traces hold positions that vary.
        return (e.kind, e.text.splitlines()[0] if e.text else "", e.url)

    def new_errors(self, baseline: list[PageEvent], since: int) -> list[PageEvent]:
        """Errors recorded after ``since`` that the empty page did not show."""
        known = {self._key(e) for e in baseline}
        return [e for e in self.events[since:] if self._key(e) not in known]

    # ---------------------------------------------------------------- graph
    def load_workflow(self, workflow: dict) -> None:
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.settle()

    def graph_to_prompt(self) -> dict:
        """The frontend's own conversion: ``(await app.graphToPrompt()).output``."""
        out = self.page.evaluate(
            "async () => JSON.stringify((await window.app.graphToPrompt()).output)")
        return json.loads(out)

    def serialize_graph(self) -> dict:
        return json.loads(self.page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))

    def registered_node_types(self) -> set[str]:
        return set(self.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)"))

    def broken_nodes(self) -> list[dict]:
        """Nodes of the loaded graph that the frontend could not back with a
        node definition (what a missing node type turns into)."""
        return self.page.evaluate(
            """() => window.app.graph.nodes
                 .filter(n => !n.constructor.nodeData && !n.isVirtualNode || n.has_errors)
                 .map(n => ({id: n.id, type: n.type, has_errors: !!n.has_errors}))""")

    def visible_dialogs(self) -> list[str]:
        """Inner text of every visible dialog (PrimeVue ``.p-dialog``)."""
        return self.page.evaluate(
            """() => Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))
                 .filter(d => d.offsetParent !== null || d.getClientRects().length)
                 .map(d => d.innerText)""")

    def missing_nodes_dialog(self) -> str | None:
        for text in self.visible_dialogs():
            if MISSING_NODES_DIALOG_TEXT in text.lower():
                return text
        return None

    def toasts(self, severities=("warn", "error")) -> list[str]:
        """Text of the visible toast notifications of these severities (the
        frontend's alerts, e.g. "Invalid workflow against zod schema")."""
        return self.page.evaluate(
            """(sev) => Array.from(document.querySelectorAll('.p-toast-message'))
                 .filter(t => sev.some(s => t.classList.contains('p-toast-message-' + s)))
                 .map(t => t.innerText)""", list(severities))

    def close_toasts(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.page.evaluate(
                """() => { const b = document.querySelectorAll('.p-toast-message .p-toast-close-button');
                           b.forEach(x => x.click()); return document.querySelectorAll('.p-toast-message').length; }""")
            if not n:
                return
            time.sleep(0.2)

    def close_dialogs(self) -> None:
        for _ in range(5):
            if not self.visible_dialogs():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    def fit_view(self) -> None:
        """Zoom and pan so that every node is on screen (as "fit view" does)."""
        self.page.evaluate(
            """() => {
                 const nodes = window.app.graph.nodes;
                 if (!nodes.length) return;
                 let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
                 for (const n of nodes) {
                   const [x, y, w, h] = n.boundingRect;
                   x0 = Math.min(x0, x); y0 = Math.min(y0, y);
                   x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
                 }
                 window.app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.9});
                 window.app.canvas.setDirty(true, true);
               }""")
        time.sleep(0.5)

    def screenshot(self, path, fit: bool = True) -> None:
        if fit:
            self.fit_view()
        self.page.screenshot(path=str(path))
