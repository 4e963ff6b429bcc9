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


#: Fields without a declared range whose widget still comes from the config (choices, seeds).
CONFIG_ONLY_DEFAULTS = ("weighting", "background")

#: node id -> the core config classes its widgets are declared from (nodes/schema.py config_input).
CONFIG_NODES = {
    "MPOD3D_OTLayoutAlign": ("mpod_core.layout.align:LayoutConfig", "mpod_core.layout.ot_loss:OTLossConfig",
                             "mpod_core.pipelines.reparo:ReferenceView"),
    "MPOD3D_Zero123SDSNeRF": ("mpod_core.pipelines.mpod123:Stage1Config",),
    "MPOD3D_SDSImageFit": ("mpod_core.pipelines.sds_fit:SDSFitConfig", "mpod_core.guidance.sds:SDSConfig"),
    "MPOD3D_TextualInversion": ("mpod_core.guidance.textual_inversion:TextualInversionConfig",),
    "MPOD3D_DSDRefine": ("mpod_core.pipelines.dsd_refine:DSDRefineConfig", "mpod_core.guidance.dsd:DSDConfig"),
    "MPOD3D_MeshDiversity": ("mpod_core.metrics:MetricConfig",),
    "MPOD3D_SceneEvaluation": ("mpod_core.scene_evaluation:SceneEvalConfig",),
}


def test_widgets_declared_from_configs_match_them_in_the_server(comfy_server):
    """Widget names, defaults, ranges and tooltips the frontend gets are the core config's:
    every widget named like a config field has that field's default, range and docstring."""
    import dataclasses
    import importlib

    from mpod_core.configdoc import field_spec

    info = comfy_server.object_info()
    problems, checked = [], 0
    for nid, paths in CONFIG_NODES.items():
        inputs = {**info[nid]["input"]["required"], **(info[nid]["input"].get("optional") or {})}
        for path in paths:
            module, name = path.split(":")
            cls = getattr(importlib.import_module(module), name)
            for f in dataclasses.fields(cls):
                if f.name not in inputs or not ("limits" in f.metadata or f.name in CONFIG_ONLY_DEFAULTS):
                    continue
                spec, (kind, opts) = field_spec(cls, f.name), inputs[f.name][:2]
                checked += 1
                if spec.options:
                    got = (list(kind) if isinstance(kind, list) else opts.get("options"), opts.get("default"))
                    want = (list(spec.options), spec.default)
                else:
                    got = (opts.get("default"), opts.get("min"), opts.get("max"))
                    want = (spec.default, spec.min, spec.max)
                if got != want:
                    problems.append(f"{nid}.{f.name}: server {got} != config {want}")
                if spec.doc and spec.doc not in opts.get("tooltip", ""):
                    problems.append(f"{nid}.{f.name}: tooltip lacks the field's docstring")
    assert checked >= 25, checked
    assert not problems, "\n".join(problems)
    layout = info["MPOD3D_OTLayoutAlign"]["input"]["required"]
    assert {"pixel_weight", "alpha", "beta", "gamma", "distance"} <= set(layout)
    assert not {"pixel_l2", "alpha_rgb", "camera_distance"} & set(layout)


def test_seeds_and_backends_are_named_and_ranged_alike_on_every_node(comfy_server):
    from nodes.registry import NODE_DISPLAY_NAMES

    info = comfy_server.object_info()
    seeds, backends = {}, {}
    for nid in NODE_DISPLAY_NAMES:
        inputs = {**info[nid]["input"]["required"], **(info[nid]["input"].get("optional") or {})}
        if "seed" in inputs:
            seeds[nid] = (inputs["seed"][1]["min"], inputs["seed"][1]["max"])
        if "backend" in inputs:
            spec = inputs["backend"]
            backends[nid] = tuple(spec[0] if isinstance(spec[0], list) else spec[1]["options"])
    assert len(seeds) >= 3 and set(seeds.values()) == {(0, 0xFFFFFFFFFFFFFFFF)}, seeds
    assert len(backends) >= 4 and set(backends.values()) == {("auto", "torch", "cuda")}, backends
