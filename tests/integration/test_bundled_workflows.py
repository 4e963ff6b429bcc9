"""Every bundled workflow is in step with the nodes' current schemas: each node's saved widget values fill
exactly the widgets it has. A widget added to a node after a workflow was saved shifts every later value
one slot (the frontend fills widgets in order, as the harness's converter does), so a seed reads "fixed"
and the run fails at validation, as happened once to themestation.json; this catches it for every file
without running any of them."""
from __future__ import annotations

import json

import pytest

from harness.paths import WORKFLOWS_DIR
from harness.workflow_convert import VIRTUAL_NODE_TYPES, node_model

pytestmark = pytest.mark.comfyui


def _fits(value, default) -> bool:
    """Whether a saved value has the kind of its widget (judged by the widget's default)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def test_every_bundled_workflow_gives_each_widget_a_value_of_its_kind(comfy_server):
    """At most one value per widget slot (trailing widgets added later keep their defaults, as in the frontend),
    and each value of its widget's kind: a value shifted by a missing one lands on a widget of another kind
    (the seed reading "fixed")."""
    info = comfy_server.object_info()
    problems, checked = [], 0
    for path in sorted(WORKFLOWS_DIR.glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            values = node.get("widgets_values")
            if node["type"] in VIRTUAL_NODE_TYPES or not isinstance(values, list):
                continue
            _, widgets = node_model(node["type"], info[node["type"]])
            slots = [w for w in widgets if w.in_values]
            checked += 1
            where = f"{path.name} node {node['id']} ({node['type']})"
            if len(values) > len(slots):
                problems.append(f"{where}: {len(values)} values for {len(slots)} widget slots")
            problems += [f"{where}: widget {w.name} (default {w.default!r}) holds {v!r}"
                         for w, v in zip(slots, values) if not _fits(v, w.default)]
    assert checked > 50, checked
    assert not problems, "\n".join(problems)
