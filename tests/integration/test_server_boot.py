"""Ladder step 3, first rung: the server boots with the pack, the pack imports
cleanly, and /object_info lists every node of the registry under its
display name."""

from __future__ import annotations

import re

from harness.paths import PACK_LINK_NAME, REPO_ROOT

PACK_MODULE = f"custom_nodes.{PACK_LINK_NAME}"


def test_pack_has_entry_point():
    assert (REPO_ROOT / "__init__.py").is_file(), "the pack has no __init__.py: ComfyUI cannot load it"


def test_pack_imports_without_errors(comfy_server):
    errors = comfy_server.pack_import_errors()
    assert not errors, "ComfyUI failed to import the pack:\n\n" + "\n\n".join(errors)
    # The loader lists every custom node folder it tried, with its import time.
    pattern = re.compile(r"^\s*[\d.]+ seconds(?P<failed> \(IMPORT FAILED\))?: "
                         + re.escape(str(comfy_server.pack_link)) + r"\s*$", re.M)
    m = pattern.search(comfy_server.log_text())
    assert m, ("the pack does not appear in ComfyUI's custom node import list; log tail:\n"
               + comfy_server.log_tail())
    assert not m.group("failed")


def test_object_info_lists_every_registered_node(comfy_server):
    from nodes.registry import NODE_DISPLAY_NAMES

    assert NODE_DISPLAY_NAMES, "nodes.registry.NODE_DISPLAY_NAMES is empty"
    info = comfy_server.object_info()
    missing = sorted(set(NODE_DISPLAY_NAMES) - set(info))
    assert not missing, f"registered nodes absent from /object_info: {missing}"
    wrong = {nid: (info[nid].get("display_name"), want) for nid, want in NODE_DISPLAY_NAMES.items()
             if info[nid].get("display_name") != want}
    assert not wrong, f"display names differ (server, registry): {wrong}"


def test_object_info_has_no_unregistered_pack_nodes(comfy_server):
    from nodes.registry import NODE_DISPLAY_NAMES

    ours = {nid for nid, d in comfy_server.object_info().items() if d.get("python_module") == PACK_MODULE}
    assert ours, f"no node in /object_info comes from {PACK_MODULE}"
    extra = sorted(ours - set(NODE_DISPLAY_NAMES))
    assert not extra, f"nodes served by the pack but missing from nodes.registry: {extra}"


def test_every_pack_node_documents_itself(comfy_server):
    """Users hover widgets for help: each node has a description, each widget a
    tooltip, each output a name (not just its type), and all sit in the pack's category."""
    from nodes.registry import CATEGORY, NODE_DISPLAY_NAMES

    info = comfy_server.object_info()
    problems = []
    for nid in NODE_DISPLAY_NAMES:
        node = info[nid]
        if not node.get("description"):
            problems.append(f"{nid}: no description")
        if not node.get("category", "").startswith(CATEGORY):
            problems.append(f"{nid}: category {node.get('category')!r} outside {CATEGORY}")
        for section in ("required", "optional"):
            for name, spec in (node["input"].get(section) or {}).items():
                widget = isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                if widget and not (len(spec) > 1 and spec[1].get("tooltip")):
                    problems.append(f"{nid}.{name}: widget without tooltip")
        if node["output_name"] and node["output_name"] == node["output"] and len(node["output"]) > 1:
            problems.append(f"{nid}: outputs named only by type {node['output_name']}")
    assert not problems, "\n".join(problems)
