"""Workflow files of the pack and of the tests, and the input files they name."""

from __future__ import annotations

import json
from pathlib import Path

from harness.images import png_bytes
from harness.paths import TEST_WORKFLOWS_DIR, WORKFLOWS_DIR
from harness.workflow_convert import UPLOAD_FLAGS, node_widget_values

# Where a bundled workflow's example inputs may live, searched in this order.
INPUT_SEARCH_DIRS = (WORKFLOWS_DIR / "inputs", WORKFLOWS_DIR / "assets", WORKFLOWS_DIR)


def bundled_workflows() -> list[Path]:
    """``<repo>/workflows/*.json`` (what users drag in)."""
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def sample_workflows() -> list[Path]:
    """``tests/data/workflows/*.json`` (frontend-made core-node samples)."""
    return sorted(TEST_WORKFLOWS_DIR.glob("*.json"))


def read_workflow(path) -> dict:
    return json.loads(Path(path).read_text())


def referenced_input_files(workflow: dict, object_info: dict) -> list[str]:
    """Values of upload combos (LoadImage's ``image`` and the like) in the
    workflow: files that must be in ComfyUI's input folder."""
    names = []
    nodes = {str(n["id"]): n for n in workflow.get("nodes") or []}
    for nid, values in node_widget_values(workflow, object_info).items():
        d = object_info[nodes[nid]["type"]]
        for section in ("required", "optional"):
            for name, spec in ((d.get("input") or {}).get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if any(opts.get(f) for f in UPLOAD_FLAGS) and isinstance(values.get(name), str):
                    if values[name] and values[name] not in names:
                        names.append(values[name])
    return names


def stage_input_files(server, workflow: dict) -> list[tuple[str, str]]:
    """Upload each input file the workflow names and the server lacks: the
    file of that name under workflows/inputs, workflows/assets or workflows/
    when the pack ships one, else a grey placeholder PNG. Returns
    ``[(name, source)]`` for what was uploaded."""
    staged = []
    for name in referenced_input_files(workflow, server.object_info()):
        if (server.input_dir / name).exists():
            continue
        rel = Path(name)
        # The shipped file by its path under the input folder, else by its name (workflows/inputs/example.glb
        # is what setup.sh copies to input/3d/example.glb).
        candidates = [d / rel for d in INPUT_SEARCH_DIRS] + [d / rel.name for d in INPUT_SEARCH_DIRS]
        source = next((c for c in candidates if c.is_file()), None)
        tmp = server.base_dir / "staging" / rel
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if source is not None:
            tmp.write_bytes(source.read_bytes())
            origin = str(source)
        else:
            tmp.write_bytes(png_bytes(64, 64))
            origin = "placeholder PNG"
        server.upload(tmp, subfolder=str(rel.parent) if str(rel.parent) != "." else "")
        staged.append((name, origin))
    return staged


def set_inputs(api: dict, by_class: dict) -> None:
    """Override widget values of an API prompt in place: ``{class_type: {input: value}}`` applies to
    every node of that class (how the live tests shrink a bundled workflow for the CPU)."""
    for node in api.values():
        node["inputs"].update(by_class.get(node["class_type"], {}))
