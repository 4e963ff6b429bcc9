"""A real ComfyUI server, headless on CPU, with this pack loaded.

The server runs in its own process with a temporary base directory (models,
input, output, user, temp) so tests never touch a user's files. The pack is
loaded the way the launcher loads it: an ``--extra-model-paths-config`` yaml
whose ``custom_nodes`` entry is a folder holding one symlink to the repo.

Only the standard library is used (urllib, json, socket, subprocess).
"""

from __future__ import annotations

import atexit
import json
import mimetypes
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from harness.paths import ARTIFACTS_DIR, PACK_LINK_NAME, REPO_ROOT, find_comfyui, find_python

MODEL_SUBDIRS = (
    "checkpoints", "clip", "clip_vision", "configs", "controlnet", "diffusion_models",
    "embeddings", "loras", "text_encoders", "unet", "upscale_models", "vae", "sams",
)


class ComfyServerError(RuntimeError):
    """The server could not be started, died, or answered unexpectedly."""


class PromptRejected(ComfyServerError):
    """POST /prompt answered 400: the prompt failed validation.

    ``error`` and ``node_errors`` hold the server's JSON."""

    def __init__(self, response: dict):
        self.response = response
        self.error = response.get("error")
        self.node_errors = response.get("node_errors", {})
        super().__init__("ComfyUI rejected the prompt: " + json.dumps(response, indent=1)[:6000])


class ExecutionError(ComfyServerError):
    """A node raised while the prompt ran (or the run was interrupted).

    Attributes mirror the ``execution_error`` message of the history entry:
    ``node_id``, ``node_type``, ``exception_type``, ``exception_message``,
    ``traceback`` (list of str); ``interrupted`` is True for an interrupt."""

    def __init__(self, entry: dict, details: dict | None, interrupted: bool = False):
        self.entry = entry
        self.details = details or {}
        self.interrupted = interrupted
        self.node_id = self.details.get("node_id")
        self.node_type = self.details.get("node_type")
        self.exception_type = self.details.get("exception_type")
        self.exception_message = self.details.get("exception_message")
        self.traceback = self.details.get("traceback") or []
        if interrupted:
            msg = f"execution interrupted at node {self.node_id} ({self.node_type})"
        else:
            msg = (
                f"node {self.node_id} ({self.node_type}) raised {self.exception_type}: "
                f"{self.exception_message}"
            )
            if self.traceback:
                msg += "\n" + "".join(self.traceback)[-4000:]
        super().__init__(msg)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Boot a ComfyUI server for tests.

    Args:
        comfyui_dir: the ComfyUI tree (default: ``find_comfyui()``).
        python: interpreter running it (default: ``find_python()``).
        base_dir: base directory; a fresh temporary one by default (removed on
            ``stop()`` unless ``MPOD3D_KEEP_SERVER_DIR=1``).
        load_pack: link this repository into the server's custom nodes.
        extra_args: more command-line arguments for ``main.py``.
        boot_timeout: seconds to wait for ``/system_stats`` to answer.

    Use as a context manager or call ``start()`` / ``stop()``.
    """

    def __init__(self, comfyui_dir: str | os.PathLike | None = None, python: str | None = None,
                 base_dir: str | os.PathLike | None = None, load_pack: bool = True,
                 extra_args: list[str] | None = None, boot_timeout: float = 180.0):
        found = Path(comfyui_dir) if comfyui_dir else find_comfyui()
        if found is None or not (found / "main.py").is_file():
            raise ComfyServerError(
                "no ComfyUI tree found: set COMFYUI_PATH or run `bash scripts/setup.sh` "
                f"(expected {REPO_ROOT / '.comfyui' / 'ComfyUI' / 'main.py'})")
        self.comfyui_dir = found
        self.python = python or find_python()
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="mpod3d-comfy-"))
        self.load_pack = load_pack
        self.extra_args = list(extra_args or [])
        self.boot_timeout = boot_timeout
        self.port = free_port()
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = None
        self.pack_link = self.base_dir / "packs" / PACK_LINK_NAME
        self.boot_seconds: float | None = None
        self._object_info: dict | None = None

    # ----------------------------------------------------------------- paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base_dir / "temp"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    # ------------------------------------------------------------- lifecycle
    def _prepare_base(self) -> Path:
        b = self.base_dir
        for d in ("custom_nodes", "input", "output", "temp", "user/default", "packs"):
            (b / d).mkdir(parents=True, exist_ok=True)
        for d in MODEL_SUBDIRS:
            (self.models_dir / d).mkdir(parents=True, exist_ok=True)
        # A stock ComfyUI ships input/example.png; workflows often name it.
        example = self.comfyui_dir / "input" / "example.png"
        if example.is_file() and not (b / "input" / "example.png").exists():
            shutil.copyfile(example, b / "input" / "example.png")
        if self.load_pack and not self.pack_link.exists():
            self.pack_link.symlink_to(REPO_ROOT, target_is_directory=True)
        yaml_path = b / "extra_model_paths.yaml"
        # JSON is valid YAML; paths are quoted safely this way.
        lines = ["mpod3d_tests:"]
        lines.append(f"  custom_nodes: {json.dumps(str(b / 'packs'))}")
        yaml_path.write_text("\n".join(lines) + "\n")
        # No templates dialog over the graph in browser tests.
        settings = b / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        return yaml_path

    def command(self) -> list[str]:
        yaml_path = self.base_dir / "extra_model_paths.yaml"
        return [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--extra-model-paths-config", str(yaml_path),
            "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            "--disable-auto-launch",
            *self.extra_args,
        ]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            return self
        self._prepare_base()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TQDM_DISABLE", "1")
        env.pop("PYTHONPATH", None)  # the pytest process's path must not leak into the server
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), cwd=str(self.comfyui_dir), env=env,
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        atexit.register(self.stop)  # never leave a server behind
        deadline = t0 + self.boot_timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(f"ComfyUI exited with code {rc} while booting. Log tail:\n{tail}")
            try:
                self._request("GET", "/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError, ComfyServerError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(
                    f"ComfyUI did not answer /system_stats within {self.boot_timeout:.0f} s. Log tail:\n{tail}")
            time.sleep(0.5)
        self.boot_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``), keep a
        copy of its log in ``artifacts/comfyui_server.log``, and remove the
        temporary base directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self.proc = None
        atexit.unregister(self.stop)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.log_path.exists():
            try:
                ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, ARTIFACTS_DIR / "comfyui_server.log")
            except OSError:
                pass
        if self._own_base and os.environ.get("MPOD3D_KEEP_SERVER_DIR") != "1":
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ logs
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def pack_import_errors(self) -> list[str]:
        """Messages from ComfyUI's custom-node loader about this pack failing
        to load ("Cannot import ...", "IMPORT FAILED", V3 entrypoint errors),
        each with the traceback logged before it when there is one."""
        if not self.load_pack:
            return []
        needle = str(self.pack_link)
        lines = self.log_text().splitlines()
        markers = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint",
                   "did not return a ComfyExtension", "did not return a list of nodes",
                   "is not callable", "Skip ")
        errors = []
        for i, line in enumerate(lines):
            if needle not in line or not any(m in line for m in markers):
                continue
            msg = line
            if "Cannot import" in line:
                # The loader logs the traceback just before this line.
                j = i - 1
                while j >= 0 and not lines[j].startswith("Traceback (most recent call last)"):
                    if i - j > 200:
                        j = -1
                        break
                    j -= 1
                if j >= 0:
                    msg = "\n".join(lines[j:i + 1])
            errors.append(msg)
        return errors

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 60.0):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype:
            return json.loads(data)
        return data

    def get_json(self, path: str, timeout: float = 60.0):
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, payload, timeout: float = 60.0):
        return self._request("POST", path, json.dumps(payload).encode(),
                             {"Content-Type": "application/json"}, timeout)

    def object_info(self, refresh: bool = False) -> dict:
        """GET /object_info (cached; ``refresh=True`` asks again)."""
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def set_setting(self, setting_id: str, value) -> None:
        """POST /settings/{id} with a JSON body (the frontend's user settings)."""
        self.post_json("/settings/" + urllib.parse.quote(setting_id, safe=""), value)

    def queue(self, prompt_api: dict, extra_data: dict | None = None, allow_partial: bool = False) -> str:
        """POST /prompt; returns the prompt id.

        Raises ``PromptRejected`` with the server's error JSON when validation
        fails. ComfyUI also accepts a prompt when only some of its output nodes
        are valid (it runs those and lists the others in ``node_errors``); that
        is rejected too, and the prompt taken off the queue, unless
        ``allow_partial=True``."""
        payload = {"prompt": prompt_api, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            resp = self.post_json("/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
            except ValueError:
                raise ComfyServerError(f"POST /prompt failed: HTTP {e.code}: {raw[:2000]!r}") from None
            raise PromptRejected(err) from None
        if resp.get("node_errors") and not allow_partial:
            self.cancel(resp["prompt_id"])
            raise PromptRejected({"error": {"type": "partially_invalid_prompt",
                                            "message": "some output nodes failed validation; "
                                                       "ComfyUI would run only the others"},
                                  "node_errors": resp["node_errors"]})
        return resp["prompt_id"]

    def rejection(self, prompt_api: dict, node_id: str) -> str:
        """Queue a prompt that validation must refuse; returns the errors of node ``node_id`` as JSON text.

        Raises AssertionError when the server accepts the prompt.
        """
        try:
            prompt_id = self.queue(prompt_api)
        except PromptRejected as rejected:
            return json.dumps(rejected.node_errors.get(node_id, {}))
        self.cancel(prompt_id)
        raise AssertionError(f"the server accepted a prompt it should refuse (node {node_id})")

    def cancel(self, prompt_id: str) -> None:
        """Take a prompt off the queue, or interrupt it if it already runs."""
        self.post_json("/queue", {"delete": [prompt_id]})
        running = self.get_json("/queue").get("queue_running") or []
        if any(len(item) > 1 and item[1] == prompt_id for item in running):
            self.interrupt(prompt_id)

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Poll /history/{id} until the prompt finished (success, error or
        interrupt); returns its history entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if not self.alive:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}. Log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s. Log tail:\n"
                                   + self.log_tail(30))
            time.sleep(poll)

    def run(self, prompt_api: dict, timeout: float = 600.0) -> dict:
        """Queue, wait, and raise ``ExecutionError`` if a node raised or the
        run was interrupted. Returns the history entry."""
        prompt_id = self.queue(prompt_api)
        entry = self.wait(prompt_id, timeout)
        self.raise_for_status(entry)
        return entry

    @staticmethod
    def raise_for_status(entry: dict) -> None:
        """Raise ``ExecutionError`` when a history entry records a node
        exception or an interrupt."""
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        for kind, details in messages:
            if kind == "execution_error":
                raise ExecutionError(entry, details)
        for kind, details in messages:
            if kind == "execution_interrupted":
                raise ExecutionError(entry, details, interrupted=True)
        if status.get("status_str") == "error":
            raise ExecutionError(entry, None)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt (all running work, or only ``prompt_id``)."""
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def upload(self, path: str | os.PathLike, subfolder: str = "", type: str = "input",
               overwrite: bool = True) -> dict:
        """POST /upload/image (multipart); any file type is accepted. Returns
        ``{"name", "subfolder", "type"}``."""
        path = Path(path)
        boundary = "----mpod3d" + uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = []
        for name, value in (("subfolder", subfolder), ("type", type),
                            ("overwrite", "true" if overwrite else "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
             f"Content-Type: {ctype}\r\n\r\n").encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self._request("POST", "/upload/image", b"".join(parts),
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def output_files(self, entry: dict, kinds=("images", "gifs", "3d", "files")) -> list[Path]:
        """Paths of the files that a history entry's outputs name (under
        output/, temp/ or input/ of the base directory)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        found = []
        for out in (entry.get("outputs") or {}).values():
            for kind, items in out.items():
                if kinds and kind not in kinds:
                    continue
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = roots.get(item.get("type", "output"), self.output_dir)
                        found.append(root / item.get("subfolder", "") / item["filename"])
        return found
