"""harness.workflow_convert.ui_to_api must give exactly what the frontend's
own ``app.graphToPrompt()`` gives, for every bundled workflow and for the
frontend-made core samples in tests/data/workflows/."""

from __future__ import annotations

import json

import pytest

from harness.workflow_convert import strip_meta, ui_to_api
from harness.workflows import bundled_workflows, read_workflow, sample_workflows

CASES = [("bundled", p) for p in bundled_workflows()] + [("sample", p) for p in sample_workflows()]


def _diff(got: dict, want: dict) -> str:
    lines = []
    for nid in sorted(set(got) | set(want), key=lambda k: (len(k), k)):
        if got.get(nid) != want.get(nid):
            lines.append(f"node {nid}:\n  ui_to_api:    {json.dumps(got.get(nid))}\n"
                         f"  graphToPrompt: {json.dumps(want.get(nid))}")
    return "\n".join(lines)


@pytest.mark.parametrize("kind,path", CASES, ids=[f"{k}/{p.stem}" for k, p in CASES])
def test_ui_to_api_matches_frontend(comfy_server, comfy_page, kind, path):
    wf = read_workflow(path)
    comfy_page.load_workflow(wf)
    want = comfy_page.graph_to_prompt()
    comfy_page.close_dialogs()
    info = comfy_server.object_info()
    got = ui_to_api(wf, info)
    assert strip_meta(got) == strip_meta(want), _diff(strip_meta(got), strip_meta(want))
    # Titles: the frontend translates core display names, so compare titles of
    # the pack's nodes and of nodes with a title of their own.
    titled = {str(n["id"]) for n in wf["nodes"] if n.get("title")}
    for nid, entry in want.items():
        module = info.get(entry["class_type"], {}).get("python_module", "")
        if nid in titled or module.startswith("custom_nodes."):
            assert got[nid]["_meta"] == entry["_meta"], (nid, got[nid]["_meta"], entry["_meta"])
