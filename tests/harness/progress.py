"""Watch a live ComfyUI's websocket messages (progress, previews) from a test."""
from __future__ import annotations

import asyncio
import json
import threading
import time


class ProgressWatcher:
    """Collects ComfyUI websocket messages (aiohttp client, in a thread)."""

    def __init__(self, server):
        self.url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
        self.messages: list[tuple[float, dict]] = []
        self.binary: list[tuple[float, int]] = []  # (time, event type) of binary frames (preview images)
        self.texts: list[tuple[str, str]] = []  # (node id, text) of progress-text frames (event type 3)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        import aiohttp
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self.messages.append((time.monotonic(), json.loads(msg.data)))
                    elif msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) >= 4:
                        kind = int.from_bytes(msg.data[:4], "big")
                        if kind == 3:  # text: 4-byte node-id length, node id, text (server.send_progress_text)
                            n = int.from_bytes(msg.data[4:8], "big")
                            self.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                        else:
                            self.binary.append((time.monotonic(), kind))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "websocket did not connect"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def progress_of(self, node_id: str):
        return [(t, m["data"]) for t, m in self.messages
                if m.get("type") == "progress" and m["data"].get("node") == node_id]

    def preview_count(self) -> int:
        """Binary frames received: ComfyUI sends each progress preview image as one."""
        return len(self.binary)


def interrupt_after(server, prompt: dict, node_id: str, steps: int, timeout: float = 300.0):
    """Queue ``prompt``, press Cancel once ``node_id`` has reported ``steps`` progress messages,
    and wait for the run to end.

    Returns:
        (history entry, highest progress value seen, seconds from Cancel to the end, previews seen).
    """
    with ProgressWatcher(server) as watch:
        pid = server.queue(prompt)
        deadline = time.monotonic() + timeout
        while len(watch.progress_of(node_id)) < steps:
            assert time.monotonic() < deadline, f"no progress from node {node_id}"
            assert server.history(pid) is None, "the run ended before any progress"
            time.sleep(0.1)
        t_int = time.monotonic()
        server.interrupt(pid)
        entry = server.wait(pid, timeout=120)
        stopped_after = time.monotonic() - t_int
        done = max(p["value"] for _, p in watch.progress_of(node_id))
        return entry, done, stopped_after, watch.preview_count()


def assert_cancel_leaves_no_file(server, prompt: dict, node_id: str, total: int, folder, stem: str) -> None:
    """Cancel ``prompt`` after ``node_id``'s first progress message; the run must end interrupted before
    ``total`` steps with no ``folder/stem*`` file and no temporary ``.*part`` left."""
    from .comfy_server import ExecutionError

    entry, done, stopped_after, _ = interrupt_after(server, prompt, node_id, steps=1)
    try:
        server.raise_for_status(entry)
    except ExecutionError as exc:
        assert exc.interrupted, exc
    else:
        raise AssertionError("the run was not interrupted")
    assert done < total
    assert not list(folder.glob(f"{stem}*")) and not list(folder.glob(".*part"))
    print(f"\ninterrupted after {done} steps, stopped {stopped_after:.1f} s later")
