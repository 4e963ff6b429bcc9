"""Regenerate tests/data/workflows/core_*.json with the real frontend.

Each sample graph is built in the browser with the frontend's own API
(LiteGraph.createNode, node.connect, widget values, node modes) and saved with
``app.graph.serialize()`` (what "Save" writes) or, for the ``*_export``
samples, with the ``workflow`` half of ``app.graphToPrompt()`` (what "Export"
and the PNG metadata hold: unlinked widget inputs are dropped from
``inputs``). So the samples are genuine frontend output, not hand-written.

Run: ``python tests/browser/generate_core_samples.py`` (boots its own server).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.browser import ComfyPage, launch_browser  # noqa: E402
from harness.comfy_server import ComfyServer  # noqa: E402
from harness.paths import TEST_WORKFLOWS_DIR  # noqa: E402

JS_HELPERS = r"""
window.__mk = {
  reset() { app.graph.clear(); },
  add(type, pos, values, opts) {
    const n = LiteGraph.createNode(type);
    if (!n) throw new Error('cannot create ' + type);
    n.pos = pos;
    app.graph.add(n);
    for (const [k, v] of Object.entries(values || {})) {
      const w = (n.widgets || []).find(w => w.name === k);
      if (!w) throw new Error(type + ' has no widget ' + k + ': ' + (n.widgets || []).map(w => w.name));
      w.value = v;
    }
    if (opts && opts.mode !== undefined) n.mode = opts.mode;
    if (opts && opts.title) n.title = opts.title;
    return n;
  },
  inSlot(node, name) {
    const i = node.inputs.findIndex(s => s.name === name);
    if (i < 0) throw new Error(node.type + ' has no input ' + name + ': ' + node.inputs.map(s => s.name));
    return i;
  },
  link(a, outSlot, b, inName) { return a.connect(outSlot, b, this.inSlot(b, inName)); },
};
"""

# name -> (javascript body building the graph, how to save: "save" | "export")
SAMPLES = {
    # LoadImage (image_upload combo + the frontend's "upload" button widget)
    # -> ImageScale (COMBO + INT widgets) -> PreviewImage; MASK branch too.
    "core_loadimage_scale_preview": ("""
        const li = M.add('LoadImage', [50, 100], {image: 'mpod3d_sample.png'});
        const sc = M.add('ImageScale', [400, 100], {upscale_method: 'bilinear', width: 96, height: 64, crop: 'center'});
        const pv = M.add('PreviewImage', [750, 100]);
        const mi = M.add('MaskToImage', [400, 400]);
        const pv2 = M.add('PreviewImage', [750, 400], {}, {title: 'Mask preview'});
        M.link(li, 0, sc, 'image'); M.link(sc, 0, pv, 'images');
        M.link(li, 1, mi, 'mask'); M.link(mi, 0, pv2, 'images');
    """, "save"),
    # Seed-like widgets: control_after_generate from the node definition
    # (ImageAddNoise.seed) and by legacy name; a real INT node (PrimitiveInt,
    # itself with control_after_generate) linked into a widget input.
    "core_seed_widgets": ("""
        const ei = M.add('EmptyImage', [50, 100], {width: 64, height: 48, batch_size: 1, color: 255});
        const an = M.add('ImageAddNoise', [400, 100], {seed: 1234, strength: 0.25, control_after_generate: 'fixed'});
        const pv = M.add('PreviewImage', [750, 100]);
        const pi = M.add('PrimitiveInt', [50, 400], {value: 72, control_after_generate: 'increment'});
        M.link(ei, 0, an, 'image'); M.link(an, 0, pv, 'images'); M.link(pi, 0, ei, 'width');
    """, "save"),
    # The same graph exported (compressed widget inputs).
    "core_seed_widgets_export": ("""
        const ei = M.add('EmptyImage', [50, 100], {width: 64, height: 48, batch_size: 2, color: 0});
        const an = M.add('ImageAddNoise', [400, 100], {seed: 99, strength: 0.5, control_after_generate: 'randomize'});
        const pv = M.add('PreviewImage', [750, 100]);
        const pi = M.add('PrimitiveInt', [50, 400], {value: 40, control_after_generate: 'fixed'});
        M.link(ei, 0, an, 'image'); M.link(an, 0, pv, 'images'); M.link(pi, 0, ei, 'height');
    """, "export"),
    # Legacy Reroute nodes (chained), Note and MarkdownNote.
    "core_reroute_notes": ("""
        const ei = M.add('EmptyImage', [50, 100], {width: 32, height: 32});
        const r1 = M.add('Reroute', [350, 120]);
        const r2 = M.add('Reroute', [450, 120]);
        const inv = M.add('ImageInvert', [550, 100]);
        const pv = M.add('PreviewImage', [850, 100]);
        const r3 = M.add('Reroute', [550, 300]);
        const pv2 = M.add('PreviewImage', [850, 300]);
        ei.connect(0, r1, 0); r1.connect(0, r2, 0); M.link(r2, 0, inv, 'image'); M.link(inv, 0, pv, 'images');
        r2.connect(0, r3, 0); M.link(r3, 0, pv2, 'images');
        M.add('Note', [50, 400], {}).widgets[0].value = 'a note';
        M.add('MarkdownNote', [350, 400], {}).widgets[0].value = '# markdown note';
    """, "save"),
    # Frontend-only PrimitiveNode driving widget inputs (INT twice, COMBO once).
    "core_primitive_node": ("""
        const ei = M.add('EmptyImage', [350, 100], {width: 64, height: 64});
        const sc = M.add('ImageScale', [700, 100], {upscale_method: 'area', width: 10, height: 20, crop: 'disabled'});
        const pv = M.add('PreviewImage', [1050, 100]);
        M.link(ei, 0, sc, 'image'); M.link(sc, 0, pv, 'images');
        const p1 = M.add('PrimitiveNode', [20, 300]);
        M.link(p1, 0, sc, 'width'); M.link(p1, 0, ei, 'height');
        p1.widgets[0].value = 48;
        const p2 = M.add('PrimitiveNode', [20, 500]);
        M.link(p2, 0, sc, 'upscale_method');
        p2.widgets[0].value = 'bicubic';
    """, "save"),
    # Muted (mode 2) and bypassed (mode 4) nodes, including a muted node
    # feeding a widget input and a bypassed node in a chain.
    "core_modes": ("""
        const ei = M.add('EmptyImage', [50, 100], {width: 24, height: 24});
        const inv = M.add('ImageInvert', [400, 100], {}, {mode: 4});
        const sh = M.add('ImageScaleBy', [700, 100], {upscale_method: 'nearest-exact', scale_by: 2.0});
        const pv = M.add('PreviewImage', [1000, 100]);
        M.link(ei, 0, inv, 'image'); M.link(inv, 0, sh, 'image'); M.link(sh, 0, pv, 'images');
        const inv2 = M.add('ImageInvert', [400, 350], {}, {mode: 2});
        const pv2 = M.add('PreviewImage', [700, 350]);
        M.link(ei, 0, inv2, 'image'); M.link(inv2, 0, pv2, 'images');
        const sv = M.add('SaveImage', [700, 600], {filename_prefix: 'muted'}, {mode: 2});
        M.link(ei, 0, sv, 'images');
        const pi = M.add('PrimitiveInt', [50, 600], {value: 17}, {mode: 2});
        const ei2 = M.add('EmptyImage', [350, 600], {width: 33, height: 22});
        const pv3 = M.add('PreviewImage', [1000, 600]);
        M.link(pi, 0, ei2, 'width'); M.link(ei2, 0, pv3, 'images');
        const pf = M.add('PrimitiveFloat', [50, 800], {value: 0.5}, {mode: 4});
        const an = M.add('ImageAddNoise', [350, 800], {seed: 5, strength: 0.75});
        const pv4 = M.add('PreviewImage', [1000, 800]);
        M.link(ei2, 0, an, 'image'); M.link(pf, 0, an, 'strength'); M.link(an, 0, pv4, 'images');
    """, "save"),
    # The same kind of graph exported.
    "core_modes_export": ("""
        const ei = M.add('EmptyImage', [50, 100], {width: 20, height: 30});
        const inv = M.add('ImageInvert', [400, 100], {}, {mode: 4});
        const pv = M.add('PreviewImage', [700, 100]);
        M.link(ei, 0, inv, 'image'); M.link(inv, 0, pv, 'images');
        const pi = M.add('PrimitiveInt', [50, 400], {value: 11}, {mode: 2});
        M.link(pi, 0, ei, 'batch_size');
    """, "export"),
    # The frontend's default graph (KSampler with seed + control widget,
    # multiline prompts, checkpoint combo).
    "core_default_graph": ("await app.loadGraphData();", "save"),
    # 3D nodes whose widgets the frontend's extensions change: Preview3D and
    # SaveGLB get an extra "image" widget (PREVIEW_3D); LoadVideo has a
    # video_upload combo; string widgets with forceInput-free STRING.
    "core_3d_and_uploads": ("""
        const p3 = M.add('Preview3D', [50, 100], {model_file: ''});
        const sg = M.add('SaveGLB', [500, 100], {filename_prefix: 'mesh/mpod3d'});
        const lv = M.add('LoadVideo', [950, 100]);
        const gc = M.add('GetVideoComponents', [1300, 100]);
        M.link(lv, 0, gc, 'video');
        const pa = M.add('PreviewAny', [1300, 400]);
        M.link(gc, 2, pa, 'source');
    """, "save"),
}


def generate(server_url: str, out_dir: Path = TEST_WORKFLOWS_DIR, names=None) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            cp = ComfyPage.open(browser, server_url)
            cp.page.evaluate(JS_HELPERS)
            for name, (body, how) in SAMPLES.items():
                if names and name not in names:
                    continue
                cp.page.evaluate("async () => { const M = window.__mk; M.reset();\n" + body + "\n}")
                cp.settle(0.5)
                if how == "save":
                    wf = cp.serialize_graph()
                else:
                    wf = json.loads(cp.page.evaluate(
                        "async () => JSON.stringify((await app.graphToPrompt()).workflow)"))
                wf.pop("id", None)
                wf.setdefault("extra", {}).pop("ds", None)
                path = out_dir / f"{name}.json"
                path.write_text(json.dumps(wf, indent=1) + "\n")
                written.append(path)
        finally:
            browser.close()
    return written


if __name__ == "__main__":
    with ComfyServer(load_pack=False) as srv:
        for p in generate(srv.url, names=sys.argv[1:] or None):
            print("wrote", p)
