"""ComfyUI's own code in a subprocess, for live tests that need in-process access (hashes of every
weight, the adapters' tensors) rather than ``/prompt``: ComfyUI's python runs a script that starts
with :data:`PRELUDE` and prints one ``RESULT <json>`` line.

The prelude gives the script: ``COMFY, REPO, SD15, WORK_DIR`` (its arguments), the pack imported
as ``mpod3d_pack``, ``digest(module)`` (a hash per state-dict tensor, to prove weights unchanged),
``refusals(factory, m, clip, vae)`` (what a training adapter says of an SDXL MODEL, a flow MODEL
and a foreign CLIP) and ``res``, the dict to print.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Sequence

from .paths import REPO_ROOT

PRELUDE = r'''
import importlib.util, json, sys, time, hashlib, copy, types
from pathlib import Path
import torch
COMFY, REPO, SD15, WORK_DIR = sys.argv[1:5]
COMFY_ARGS = sys.argv[5:]
sys.path.insert(0, COMFY)
sys.argv = [sys.argv[0], "--cpu"] + COMFY_ARGS
import comfy.options; comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("mpod3d_pack", REPO + "/__init__.py", submodule_search_locations=[REPO])
pack = importlib.util.module_from_spec(spec); sys.modules["mpod3d_pack"] = pack; spec.loader.exec_module(pack)
import comfy.sd, comfy.model_base
res = {}

def digest(module):
    """{state-dict key: SHA-1 of the tensor's bytes}: equal digests = bit-identical weights. SHA-1 (CPU
    SHA extensions) on two threads (hashlib releases the GIL): 3x faster than one-thread BLAKE2b on the
    2-core box (337 MB of float32 tensors: 1.2 s against 3.4-4.3 s, measured while it was loaded)."""
    from concurrent.futures import ThreadPoolExecutor
    def one(item):
        k, v = item
        return k, hashlib.sha1(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data).hexdigest()
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, module.state_dict().items()))

def refusals(factory, m, clip, vae):
    """factory(model, clip, vae)'s ValueError (or None) for an SDXL MODEL, a flow MODEL and a foreign CLIP."""
    errors = {}
    def err(name, fn):
        try:
            fn(); errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    with torch.inference_mode(False):
        sdxl = copy.copy(m); sdxl.model = copy.copy(m.model); sdxl.model.__class__ = comfy.model_base.SDXL
        err("sdxl", lambda: factory(sdxl, clip, vae))
        flow = copy.copy(m); flow.model = copy.copy(m.model); flow.model.model_type = comfy.model_base.ModelType.FLOW
        err("flow", lambda: factory(flow, clip, vae))
        err("clip", lambda: factory(m, types.SimpleNamespace(cond_stage_model=object()), vae))
    return errors
'''


def run_script(server, body: str, checkpoint: str, work_dir: Path, comfy_args: Sequence[str] = (),
               timeout: float = 900) -> dict:
    """Run :data:`PRELUDE` + ``body`` with ComfyUI's python on ``checkpoint`` (a file name in the
    server's models/checkpoints); returns the dict of its ``RESULT`` line (printed, for the log)."""
    script = work_dir / "inprocess_script.py"
    script.write_text(PRELUDE + body)
    ckpt = (server.models_dir / "checkpoints" / checkpoint).resolve()
    proc = subprocess.run([server.python, str(script), str(server.comfyui_dir), str(REPO_ROOT), str(ckpt),
                           str(work_dir), *comfy_args], capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(res, indent=1))
    return res
