"""harness.workflow_convert.ui_to_api on handwritten UI workflows with a fake
/object_info (no server, no browser). The browser parity test checks the same
rules against the real frontend."""

from __future__ import annotations

import pytest

from harness.workflow_convert import (
    MissingNodeType, UnsupportedWorkflow, node_model, node_widget_values, strip_meta, ui_to_api,
)

OBJECT_INFO = {
    "Source": {
        "input": {"required": {"width": ["INT", {"default": 8}], "seed": ["INT", {"default": 0}]}},
        "input_order": {"required": ["width", "seed"]},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "display_name": "Source Node",
    },
    "Sampler": {
        "input": {
            "required": {
                "image": ["IMAGE"],
                "noise": ["INT", {"default": 1, "control_after_generate": True}],
                "method": [["a", "b", "c"]],
                "strength": ["FLOAT", {"default": 0.5}],
                "label": ["STRING", {"forceInput": True}],
            },
            "optional": {
                "mask": ["MASK"],
                "mode": ["COMBO", {"options": ["x", "y"], "default": "y"}],
                "flag": ["BOOLEAN", {"default": True}],
            },
        },
        "input_order": {"required": ["image", "noise", "method", "strength", "label"],
                        "optional": ["mask", "mode", "flag"]},
        "output": ["IMAGE"], "output_name": ["IMAGE"], "display_name": "Sampler Node",
    },
    "Loader": {
        "input": {"required": {"file": [["one.png", "two.png"], {"image_upload": True}],
                               "scale": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["file", "scale"]},
        "output": ["IMAGE", "MASK"], "output_name": ["IMAGE", "MASK"], "display_name": "Loader",
    },
    "Sink": {
        "input": {"required": {"images": ["IMAGE"], "prefix": ["STRING", {"default": "out"}]},
                  "hidden": {"prompt": "PROMPT"}},
        "input_order": {"required": ["images", "prefix"], "hidden": ["prompt"]},
        "output": [], "output_name": [], "display_name": "Sink", "output_node": True,
    },
    "Lister": {
        "input": {"required": {"values": ["STRING", {"default": ""}]}},
        "input_order": {"required": ["values"]},
        "output": ["STRING"], "output_name": ["STRING"], "display_name": "Lister",
    },
    "IntSource": {
        "input": {"required": {"value": ["INT", {"control_after_generate": True}]}},
        "input_order": {"required": ["value"]},
        "output": ["INT"], "output_name": ["INT"], "display_name": "Int",
    },
}


def node(nid, type_, widgets=None, inputs=(), mode=0, title=None, outputs=None):
    n = {"id": nid, "type": type_, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
         "mode": mode, "properties": {},
         "inputs": [{"name": name, "type": t, "link": link} for name, t, link in inputs]}
    if widgets is not None:
        n["widgets_values"] = widgets
    if title:
        n["title"] = title
    if outputs is not None:
        n["outputs"] = outputs
    return n


def wf(nodes, links):
    return {"nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def test_widget_model_matches_frontend_rules():
    slots, widgets = node_model("Sampler", OBJECT_INFO["Sampler"])
    # Sockets first (incl. forceInput), then one input per widget.
    assert [s.name for s in slots] == ["image", "label", "mask", "noise", "method", "strength", "mode", "flag"]
    assert [w.name for w in widgets] == ["noise", "control_after_generate", "method", "strength", "mode", "flag"]
    assert [w.in_prompt for w in widgets] == [True, False, True, True, True, True]
    # Legacy convention: an INT named seed gets a control widget unasked.
    assert [w.name for w in node_model("Source", OBJECT_INFO["Source"])[1]] == [
        "width", "seed", "control_after_generate"]
    # Upload combos get an "upload" button after every other input.
    assert [(w.name, w.in_prompt) for w in node_model("Loader", OBJECT_INFO["Loader"])[1]] == [
        ("file", True), ("scale", True), ("upload", False)]


def test_widgets_links_and_controls():
    w = wf(
        [node(1, "Source", [16, 7, "fixed"]),
         node(2, "Sampler", [3, "increment", "c", 0.25, "x", False],
              inputs=[("image", "IMAGE", 1), ("label", "STRING", 3), ("mask", "MASK", 2)]),
         node(3, "Lister", ["hello"]),
         node(4, "Sink", ["final"], inputs=[("images", "IMAGE", 4)], title="My sink")],
        [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 1, 2, 2, "MASK"], [3, 3, 0, 2, 1, "STRING"], [4, 2, 0, 4, 0, "IMAGE"]],
    )
    api = ui_to_api(w, OBJECT_INFO)
    assert api == {
        "1": {"inputs": {"width": 16, "seed": 7}, "class_type": "Source", "_meta": {"title": "Source Node"}},
        "2": {"inputs": {"noise": 3, "method": "c", "strength": 0.25, "mode": "x", "flag": False,
                         "image": ["1", 0], "label": ["3", 0], "mask": ["1", 1]},
              "class_type": "Sampler", "_meta": {"title": "Sampler Node"}},
        "3": {"inputs": {"values": "hello"}, "class_type": "Lister", "_meta": {"title": "Lister"}},
        "4": {"inputs": {"prefix": "final", "images": ["2", 0]}, "class_type": "Sink",
              "_meta": {"title": "My sink"}},
    }


def test_short_or_missing_widgets_values_keep_defaults():
    w = wf([node(1, "Sampler", [9]), node(2, "Loader", ["two.png"]), node(3, "Sink")], [])
    api = strip_meta(ui_to_api(w, OBJECT_INFO))
    assert api["1"]["inputs"] == {"noise": 9, "method": "a", "strength": 0.5, "mode": "y", "flag": True}
    assert api["2"]["inputs"] == {"file": "two.png", "scale": 1.0}
    assert api["3"]["inputs"] == {"prefix": "out"}


def test_linked_widget_keeps_its_slot_and_the_link_wins():
    w = wf(
        [node(1, "IntSource", [5, "randomize"]),
         node(2, "Source", [16, 7, "fixed"], inputs=[("width", "INT", 1)])],
        [[1, 1, 0, 2, 0, "INT"]],
    )
    api = strip_meta(ui_to_api(w, OBJECT_INFO))
    assert api["2"]["inputs"] == {"width": ["1", 0], "seed": 7}
    assert api["1"]["inputs"] == {"value": 5}


def test_primitive_node_writes_its_value_into_linked_widgets():
    prim = node(5, "PrimitiveNode", [99, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [1, 2]}])
    w = wf(
        [prim,
         node(1, "Source", [16, 7, "fixed"], inputs=[("width", "INT", 1)]),
         node(2, "Sampler", [3, "fixed", "a", 0.5, "x", True], inputs=[("noise", "INT", 2)])],
        [[1, 5, 0, 1, 0, "INT"], [2, 5, 0, 2, 0, "INT"]],
    )
    api = strip_meta(ui_to_api(w, OBJECT_INFO))
    assert "5" not in api
    assert api["1"]["inputs"] == {"width": 99, "seed": 7}
    assert api["2"]["inputs"]["noise"] == 99


def test_reroutes_notes_and_modes():
    w = wf(
        [node(1, "Source", [16, 7, "fixed"]),
         node(2, "Reroute", inputs=[("", "*", 1)]),
         node(3, "Reroute", inputs=[("", "*", 2)]),
         node(4, "Sink", ["a"], inputs=[("images", "IMAGE", 3)]),
         node(5, "Sampler", [1, "fixed", "a", 0.5, "x", True], inputs=[("image", "IMAGE", 4)], mode=4),
         node(6, "Sink", ["b"], inputs=[("images", "IMAGE", 5)]),
         node(7, "Source", [1, 2, "fixed"], mode=2),
         node(8, "Sink", ["c"], inputs=[("images", "IMAGE", 6)]),
         node(9, "IntSource", [3, "fixed"], mode=2),
         node(10, "Source", [10, 11, "fixed"], inputs=[("width", "INT", 7)]),
         node(11, "Note", ["just a note"]),
         node(12, "Sampler", [1, "fixed", "a", 0.5, "x", True], inputs=[("image", "IMAGE", 8)], mode=4),
         node(13, "Lister", ["m"], inputs=[("values", "STRING", 9)])],
        [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 0, "*"], [3, 3, 0, 4, 0, "IMAGE"],
         [4, 1, 0, 5, 0, "IMAGE"], [5, 5, 0, 6, 0, "IMAGE"],
         [6, 7, 0, 8, 0, "IMAGE"], [7, 9, 0, 10, 0, "INT"],
         [8, 1, 1, 12, 0, "IMAGE"], [9, 12, 0, 13, 0, "STRING"]],
    )
    api = strip_meta(ui_to_api(w, OBJECT_INFO))
    assert set(api) == {"1", "4", "6", "8", "10", "13"}
    assert api["4"]["inputs"]["images"] == ["1", 0]         # through two Reroutes
    assert api["6"]["inputs"]["images"] == ["1", 0]         # through the bypassed Sampler
    assert "images" not in api["8"]["inputs"]                # from a muted node: dropped
    assert api["10"]["inputs"] == {"seed": 11}               # widget fed by a muted node: dropped too
    # Bypass maps STRING to the Sampler's unlinked "label": the link resolves to
    # nothing, so the widget keeps its own value (unlike the muted case).
    assert api["13"]["inputs"] == {"values": "m"}


def test_list_values_are_wrapped():
    w = wf([node(1, "Lister", [["a", "b"]])], [])
    assert ui_to_api(w, OBJECT_INFO)["1"]["inputs"] == {"values": {"__value__": ["a", "b"]}}


def test_errors_for_unknown_and_unsupported_things():
    with pytest.raises(MissingNodeType, match="NoSuchNode"):
        ui_to_api(wf([node(1, "NoSuchNode", [])], []), OBJECT_INFO)
    sub = wf([node(1, "Source", [1, 2])], [])
    sub["definitions"] = {"subgraphs": [{"id": "abc", "nodes": []}]}
    with pytest.raises(UnsupportedWorkflow, match="subgraph"):
        ui_to_api(sub, OBJECT_INFO)


def test_node_widget_values_include_muted_nodes():
    w = wf([node(1, "Loader", ["one.png", 2.0, "image"], mode=2)], [])
    assert node_widget_values(w, OBJECT_INFO) == {"1": {"file": "one.png", "scale": 2.0, "upload": "image"}}
