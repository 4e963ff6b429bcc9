"""UI-format workflow (what the frontend saves) → API-format prompt (what
``POST /prompt`` takes), reproducing ComfyUI frontend 1.32.x's own
``app.graphToPrompt()`` without a browser.

What the frontend does, and so what this does (checked against the real
frontend by ``tests/browser/test_workflow_convert_parity.py``):

* Widgets. A node's widgets are built from its definition in ``/object_info``:
  inputs in ``input_order`` (required, then optional, then any input an
  extension added), each input whose type has a widget constructor (INT,
  FLOAT, STRING, BOOLEAN, COMBO or an option list, MARKDOWN, COLOR, ...) and
  no ``forceInput`` gets one widget. ``widgets_values`` fills them in that
  order. Extra widgets that the frontend adds also take a slot in
  ``widgets_values`` but are not sent to the server:

  - ``control_after_generate`` after an INT with ``control_after_generate``
    (or, when that option is absent, an INT named ``seed``/``noise_seed``);
    after a COMBO with it, two: the control and ``control_filter_list``;
  - ``upload`` (value ``"image"``) for a required combo with
    ``image_upload``/``video_upload``/``animated_image_upload``; it comes
    after all other inputs.

  Some core extensions add widgets that *are* sent: Preview3D and SaveGLB get
  an ``image`` widget (value ``""``), PreviewAny a ``preview`` widget.
* A widget input that is connected by a link still has its value in
  ``widgets_values`` (the slot is kept); the link wins in the prompt.
* Links are followed through Reroute nodes and through bypassed nodes
  (mode 4: an output maps to the input of the same index when its type fits,
  else the first input of the exact type, else the first compatible one).
  A link from a muted node (mode 2) or from nothing resolvable is dropped, and
  when that input was a widget its value is dropped too (the input is then
  missing from the prompt, as the frontend sends it).
* Frontend-only nodes (Reroute, PrimitiveNode, Note, MarkdownNote) and muted
  or bypassed nodes are not in the prompt. A PrimitiveNode writes its value
  into every widget it is linked to (even when it is muted or bypassed).
* Widget values that are lists are sent as ``{"__value__": [...]}``.
* ``_meta.title`` is the node's title, else its display name (the frontend
  translates core display names, so titles of core nodes may differ).

Not supported (raise ``UnsupportedWorkflow``): subgraphs, legacy group nodes,
widget types owned by frontend extensions that this module does not model
(LOAD_3D, WEBCAM, audio widgets, remote combos, ...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

VIRTUAL_NODE_TYPES = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}

# Widget constructors of the frontend (ComfyWidgets) that hold one value.
SIMPLE_WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "COLOR", "TEXTAREA"}
# Widget types the frontend knows but this module does not model.
UNSUPPORTED_WIDGET_TYPES = {
    "IMAGECOMPARE", "CHART", "GALLERIA", "LOAD_3D", "WEBCAM", "AUDIO_UI", "AUDIOUPLOAD",
    "AUDIO_RECORD",
}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4

_UNDEFINED = object()  # a widget whose value is JS undefined: the key is left out


class UnsupportedWorkflow(ValueError):
    """The workflow uses something this converter does not reproduce."""


class MissingNodeType(KeyError):
    """A node's type is neither in /object_info nor a frontend-only node."""


@dataclass
class Widget:
    name: str
    default: object
    in_values: bool = True   # takes a slot in widgets_values (widget.serialize !== false)
    in_prompt: bool = True   # sent in the prompt (widget.options.serialize !== false)


@dataclass
class SlotSpec:
    name: str
    type: str
    is_widget: bool


def _input_specs(node_type: str, node_def: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order, after the frontend's
    own extensions changed the definition."""
    inputs = node_def.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    # Comfy.UploadImage: an "upload" pseudo-input for media combos.
    for name, spec in list(required.items()):
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        is_combo = isinstance(spec[0], list) or spec[0] == "COMBO"
        if is_combo and any(opts.get(f) is True for f in UPLOAD_FLAGS):
            required["upload"] = ["IMAGEUPLOAD", {**opts, "imageInputName": name}]
            break
    if node_type in ("Preview3D", "SaveGLB"):  # Comfy.Preview3D / Comfy.SaveGLB
        required["image"] = ["PREVIEW_3D"]
    if any(_spec_opts(spec).get("audio_upload") for spec in required.values()):
        raise UnsupportedWorkflow(f"{node_type}: audio upload widgets are not modelled")

    order = node_def.get("input_order") or {}
    seen, out = set(), []
    if order:
        for name in order.get("required") or []:
            if name in required:
                out.append((name, required[name], False))
                seen.add(name)
        for name in order.get("optional") or []:
            if name in optional and name not in seen:
                out.append((name, optional[name], True))
                seen.add(name)
    for name, spec in list(required.items()) + list(optional.items()):
        if name not in seen:
            out.append((name, spec, name in optional and name not in required))
            seen.add(name)
    return out


def _spec_type(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else str(t)


def _spec_opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_options(spec) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return list(_spec_opts(spec).get("options") or [])


def node_model(node_type: str, node_def: dict) -> tuple[list[SlotSpec], list[Widget]]:
    """The input slots and the widgets that the frontend gives a node of this
    definition, in the frontend's order."""
    sockets, widget_slots, widgets = [], [], []
    for name, spec, _optional in _input_specs(node_type, node_def):
        t = _spec_type(spec)
        opts = _spec_opts(spec)
        wtype = opts.get("widgetType") or t
        has_widget = (wtype in SIMPLE_WIDGET_TYPES or wtype in ("IMAGEUPLOAD", "PREVIEW_3D")
                      or wtype in UNSUPPORTED_WIDGET_TYPES)
        if not has_widget or opts.get("forceInput"):
            sockets.append(SlotSpec(name, t, False))
            continue
        if wtype in UNSUPPORTED_WIDGET_TYPES:
            raise UnsupportedWorkflow(f"{node_type}.{name}: widget type {wtype} is not modelled")
        if opts.get("remote"):
            raise UnsupportedWorkflow(f"{node_type}.{name}: remote combos are not modelled")
        if not opts.get("socketless"):
            widget_slots.append(SlotSpec(name, t, True))
        if wtype == "IMAGEUPLOAD":
            widgets.append(Widget(name, "image", in_prompt=False))
            continue
        if wtype == "PREVIEW_3D":
            widgets.append(Widget(name, ""))
            continue
        if wtype in ("INT", "FLOAT"):
            default = opts.get("default", 0)
        elif wtype == "BOOLEAN":
            default = opts.get("default", False)
        elif wtype == "COMBO":
            options = _combo_options(spec)
            default = opts.get("default") or (options[0] if options else _UNDEFINED)
        else:
            default = opts.get("default", "")
        widgets.append(Widget(name, default))
        control = opts.get("control_after_generate")
        if wtype == "INT":
            if control is None:
                control = name in ("seed", "noise_seed")
            if control:
                cname = control if isinstance(control, str) else "control_after_generate"
                widgets.append(Widget(cname, "randomize", in_prompt=False))
        elif wtype == "COMBO" and control:
            cname = control if isinstance(control, str) else "control_after_generate"
            widgets.append(Widget(cname, "randomize", in_prompt=False))
            widgets.append(Widget("control_filter_list", "", in_prompt=False))
    if node_type == "PreviewAny":  # Comfy.PreviewAny adds a read-only MARKDOWN widget
        widgets.append(Widget("preview", "", in_values=False))
    return sockets + widget_slots, widgets


def _is_valid_connection(a, b) -> bool:
    """LiteGraph.isValidConnection."""
    a = 0 if a in ("", "*", None, 0) else a
    b = 0 if b in ("", "*", None, 0) else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_is_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


def _links_by_id(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["id"], link["origin_id"], link["origin_slot"],
                                 link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = tuple(link[:6])
    return links


class _Converter:
    def __init__(self, workflow: dict, object_info: dict):
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise UnsupportedWorkflow("subgraphs are not supported")
        if (workflow.get("extra") or {}).get("groupNodes"):
            raise UnsupportedWorkflow("legacy group nodes are not supported")
        self.object_info = object_info
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes") or []}
        self.links = _links_by_id(workflow)
        missing = sorted({n["type"] for n in self.nodes.values()
                          if n["type"] not in object_info and n["type"] not in VIRTUAL_NODE_TYPES})
        if missing:
            raise MissingNodeType(f"node types not known to the server: {missing}")
        self.models = {}
        for nid, n in self.nodes.items():
            if n["type"] not in VIRTUAL_NODE_TYPES:
                self.models[nid] = node_model(n["type"], object_info[n["type"]])

    # ---- per-node state
    def live_inputs(self, nid: str) -> list[dict]:
        """The node's inputs as the frontend holds them after loading:
        sockets, then widget inputs (definition order), each with its link."""
        node = self.nodes[nid]
        ui_inputs = node.get("inputs") or []
        if nid not in self.models:
            return [{"name": i.get("name", ""), "type": i.get("type", "*"), "link": i.get("link")}
                    for i in ui_inputs]
        by_name = {i.get("name"): i for i in ui_inputs}
        slots, _ = self.models[nid]
        out = [{"name": s.name, "type": s.type, "link": (by_name.get(s.name) or {}).get("link"),
                "widget": s.is_widget} for s in slots]
        known = {s.name for s in slots}
        for i in ui_inputs:  # inputs the definition does not declare (dynamic ones)
            if i.get("name") not in known:
                out.append({"name": i.get("name"), "type": i.get("type", "*"), "link": i.get("link"),
                            "widget": bool(i.get("widget"))})
        return out

    def widget_values(self, nid: str) -> dict:
        """name -> value after LGraphNode.configure: widgets_values fill the
        widgets that take a slot, in order; missing ones keep defaults."""
        node = self.nodes[nid]
        _, widgets = self.models[nid]
        values = {w.name: w.default for w in widgets}
        wv = node.get("widgets_values")
        if isinstance(wv, list):
            slotted = [w for w in widgets if w.in_values]
            for w, v in zip(slotted, wv):
                values[w.name] = v
        return values

    # ---- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput)
    def resolve_input(self, nid: str, slot: int, visited: set, type_=None):
        key = f"{nid}[I]{slot}"
        if key in visited:
            raise UnsupportedWorkflow(f"circular link resolution at node {nid} input {slot}")
        visited.add(key)
        inputs = self.live_inputs(nid)
        if slot >= len(inputs):
            raise UnsupportedWorkflow(f"node {nid} has no input slot {slot}")
        inp = inputs[slot]
        if inp["link"] is None:
            return None
        link = self.links.get(inp["link"])
        if link is None:
            raise UnsupportedWorkflow(f"node {nid} input {inp['name']!r}: link {inp['link']} not in links")
        origin = str(link[1])
        if origin not in self.nodes:
            raise UnsupportedWorkflow(f"link {link[0]} comes from unknown node {origin}")
        return self.resolve_output(origin, int(link[2]), type_ if type_ is not None else inp["type"], visited)

    def resolve_output(self, nid: str, slot: int, type_, visited: set):
        key = f"{nid}[O]{slot}"
        if key in visited:
            raise UnsupportedWorkflow(f"circular link resolution at node {nid} output {slot}")
        visited.add(key)
        node = self.nodes[nid]
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            idx = self._bypass_slot_index(nid, slot, type_)
            if idx == -1:
                return None
            return self.resolve_input(nid, idx, visited)
        if node["type"] in VIRTUAL_NODE_TYPES:
            inputs = self.live_inputs(nid)
            if slot < len(inputs) and inputs[slot]["link"] is not None:
                return self.resolve_input(nid, slot, visited, type_)
            return None
        return (nid, slot)

    def _output_type(self, nid: str, slot: int):
        outs = self.nodes[nid].get("outputs") or []
        if slot < len(outs):
            return outs[slot].get("type")
        od = self.object_info.get(self.nodes[nid]["type"], {}).get("output") or []
        return od[slot] if slot < len(od) else "*"

    def _bypass_slot_index(self, nid: str, slot: int, type_) -> int:
        inputs = self.live_inputs(nid)
        out_type = self._output_type(nid, slot)
        if type_ in ("*", ""):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            t = inputs[slot]["type"]
            if _is_valid_connection(t, out_type) and _is_valid_connection(t, type_):
                return slot
        for i, inp in enumerate(inputs):
            if inp["type"] == type_:
                return i
        for i, inp in enumerate(inputs):
            if _is_valid_connection(inp["type"], out_type) and _is_valid_connection(inp["type"], type_):
                return i
        return -1

    # ---- PrimitiveNode.applyToGraph
    def primitive_overrides(self) -> dict:
        overrides = {}
        for nid, node in self.nodes.items():
            if node["type"] != "PrimitiveNode":
                continue
            outs = node.get("outputs") or []
            link_ids = (outs[0].get("links") or []) if outs else []
            if not link_ids:
                continue
            wv = node.get("widgets_values")
            value = wv[0] if isinstance(wv, list) and wv else _UNDEFINED
            if (node.get("properties") or {}).get("Run widget replace on values") and isinstance(value, str):
                raise UnsupportedWorkflow(f"PrimitiveNode {nid}: 'Run widget replace on values' is not modelled")
            for lid in link_ids:
                link = self.links.get(lid)
                if link is None:
                    continue
                target = str(link[3])
                if target not in self.models:
                    continue
                name = None
                for inp in self.nodes[target].get("inputs") or []:
                    if inp.get("link") == lid:
                        name = (inp.get("widget") or {}).get("name") or inp.get("name")
                if name is None:
                    continue
                if any(w.name == name for w in self.models[target][1]):
                    overrides[(target, name)] = value
        return overrides

    def title(self, nid: str) -> str:
        node = self.nodes[nid]
        if node.get("title"):
            return node["title"]
        d = self.object_info.get(node["type"], {})
        return d.get("display_name") or node["type"]

    def convert(self) -> dict:
        overrides = self.primitive_overrides()
        output = {}
        for nid, node in self.nodes.items():
            if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
                continue
            inputs = {}
            values = self.widget_values(nid)
            for w in self.models[nid][1]:
                if not w.in_prompt:
                    continue
                v = overrides.get((nid, w.name), values[w.name])
                if v is _UNDEFINED:
                    continue
                inputs[w.name] = {"__value__": copy.deepcopy(v)} if isinstance(v, list) else copy.deepcopy(v)
            for i, inp in enumerate(self.live_inputs(nid)):
                resolved = self.resolve_input(nid, i, set())
                if resolved is None:
                    continue
                inputs[inp["name"]] = [resolved[0], resolved[1]]
            output[nid] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": self.title(nid)}}
        for entry in output.values():
            for k in list(entry["inputs"]):
                v = entry["inputs"][k]
                if isinstance(v, list) and len(v) == 2 and v[0] not in output:
                    del entry["inputs"][k]
        return output


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API format of ``POST /prompt``,
    as the frontend's ``app.graphToPrompt()`` does.

    Args:
        workflow: the UI JSON (``nodes``, ``links``, ``widgets_values``...).
        object_info: ``GET /object_info`` of the server that will run it.

    Returns:
        ``{node_id: {"inputs": {...}, "class_type": str, "_meta": {"title": str}}}``;
        linked inputs are ``[source_node_id, output_index]``.

    Raises:
        MissingNodeType: a node type the server does not have.
        UnsupportedWorkflow: subgraphs, group nodes, unmodelled widgets.
    """
    return _Converter(workflow, object_info).convert()


def strip_meta(prompt: dict) -> dict:
    """The prompt without ``_meta`` (which the server ignores)."""
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


def node_widget_values(workflow: dict, object_info: dict) -> dict:
    """``{node_id: {widget_name: value}}`` for every non-virtual node (muted
    and bypassed ones too), as the frontend holds them after loading."""
    conv = _Converter(workflow, object_info)
    return {nid: {k: v for k, v in conv.widget_values(nid).items() if v is not _UNDEFINED}
            for nid in conv.models}
