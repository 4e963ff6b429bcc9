"""Ladder step 4: the real frontend loads every bundled workflow with no
missing node types and no console errors beyond the empty page's own.
Screenshots go to artifacts/browser/<workflow>.png."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest

from harness.browser import ComfyPage, is_ignorable
from harness.paths import ARTIFACTS_DIR, TEST_WORKFLOWS_DIR
from harness.workflow_convert import MissingNodeType
from harness.workflows import bundled_workflows, read_workflow, sample_workflows, stage_input_files

SCREENSHOTS = ARTIFACTS_DIR / "browser"
FAKE_TYPE = "MPOD3D_NoSuchNodeType"


@dataclass
class LoadReport:
    missing_types: list = field(default_factory=list)
    dialog: str | None = None
    alerts: list = field(default_factory=list)
    broken_nodes: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    staged: list = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        if self.missing_types:
            out.append(f"node types the frontend does not know: {self.missing_types}")
        if self.dialog:
            out.append("missing-nodes dialog shown:\n" + self.dialog)
        if self.alerts:
            out.append("frontend alerts:\n" + "\n".join(f"  {a}" for a in self.alerts))
        if self.broken_nodes:
            out.append(f"nodes without a definition or with errors: {self.broken_nodes}")
        if self.errors:
            out.append("new console/page errors:\n" + "\n".join(f"  {e}" for e in self.errors))
        return out


def workflow_node_types(wf: dict) -> set[str]:
    types = {n["type"] for n in wf.get("nodes") or []}
    for sg in (wf.get("definitions") or {}).get("subgraphs") or []:
        types |= {n["type"] for n in sg.get("nodes") or []}
        types.discard(sg.get("id"))
    return types


def load_and_check(server, page: ComfyPage, wf: dict, screenshot=None) -> LoadReport:
    report = LoadReport()
    try:
        report.staged = stage_input_files(server, wf)
    except MissingNodeType:
        pass  # reported below, by the frontend itself
    page.close_toasts()
    mark = page.mark()
    page.load_workflow(wf)
    report.alerts = page.toasts()
    report.missing_types = sorted(workflow_node_types(wf) - page.registered_node_types())
    report.dialog = page.missing_nodes_dialog()
    report.broken_nodes = page.broken_nodes()
    for e in page.new_errors(page.baseline, mark):
        (report.ignored if is_ignorable(e) else report.errors).append(e)
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        if not report.dialog:
            page.close_dialogs()  # e.g. a missing-models notice; keep the graph visible
        page.screenshot(screenshot)
    page.close_dialogs()
    page.close_toasts()
    return report


def test_pack_ships_workflows():
    assert bundled_workflows(), "workflows/ holds no .json workflow"


@pytest.mark.parametrize("path", bundled_workflows(), ids=lambda p: p.stem)
def test_frontend_loads_bundled_workflow(comfy_server, comfy_page, path):
    report = load_and_check(comfy_server, comfy_page, read_workflow(path), SCREENSHOTS / f"{path.stem}.png")
    for name, origin in report.staged:
        print(f"staged input {name} from {origin}")
    for e in report.ignored:
        print(f"ignored ({is_ignorable(e)}): {e}")
    problems = report.problems()
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", sample_workflows(), ids=lambda p: p.stem)
def test_frontend_loads_core_samples_cleanly(comfy_server, comfy_page, path):
    """The checks above pass on frontend-made core workflows (no false alarms)."""
    report = load_and_check(comfy_server, comfy_page, read_workflow(path))
    assert not report.problems(), f"{path.name}:\n" + "\n".join(report.problems())


def test_missing_node_detection_fires(comfy_server, comfy_page):
    """A workflow with an unknown node type is caught three ways."""
    wf = copy.deepcopy(read_workflow(TEST_WORKFLOWS_DIR / "core_seed_widgets.json"))
    victim = next(n for n in wf["nodes"] if n["type"] == "ImageAddNoise")
    victim["type"] = FAKE_TYPE
    report = load_and_check(comfy_server, comfy_page, wf, SCREENSHOTS / "_missing_node_sanity.png")
    assert report.missing_types == [FAKE_TYPE]
    assert report.dialog and FAKE_TYPE in report.dialog
    assert any(b["id"] == victim["id"] for b in report.broken_nodes), report.broken_nodes
    # And the page is usable again afterwards.
    assert comfy_page.missing_nodes_dialog() is None


def test_schema_alert_detection_fires(comfy_server, comfy_page):
    """A workflow the frontend's schema check rejects raises an alert, and the
    check reports it."""
    wf = copy.deepcopy(read_workflow(TEST_WORKFLOWS_DIR / "handwritten_minimal.json"))
    del wf["nodes"][0]["size"]
    report = load_and_check(comfy_server, comfy_page, wf)
    assert any("schema" in a for a in report.alerts), report
    assert not comfy_page.toasts()
