// Frontend extension of ComfyUI-MPOD3D.
// - Tints the pack's nodes so they are easy to find in a large graph.
// - Load Mesh: an "upload mesh" button that uploads a file into input/3d and selects it.
// - Save Mesh: a "download" button for the last saved file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "MPOD3D_";
const MESH_EXTENSIONS = [".glb", ".gltf", ".obj", ".ply", ".stl"];
const UPLOAD_SUBFOLDER = "3d";
const NODE_COLOR = "#223344";
const NODE_BGCOLOR = "#2e4057";

function addButton(node, label, callback) {
  const widget = node.addWidget("button", label, null, callback, { serialize: false });
  widget.serialize = false; // never part of widgets_values: saved workflows stay stable
  return widget;
}

async function uploadMesh(file) {
  const body = new FormData();
  body.append("image", file, file.name); // /upload/image stores any file type
  body.append("subfolder", UPLOAD_SUBFOLDER);
  body.append("type", "input");
  const response = await api.fetchApi("/upload/image", { method: "POST", body });
  if (response.status !== 200) {
    throw new Error(`upload failed: ${response.status} ${response.statusText}`);
  }
  const data = await response.json();
  return data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
}

function setupLoadMesh(node) {
  const combo = node.widgets?.find((w) => w.name === "mesh_file");
  if (!combo) return;
  const picker = document.createElement("input");
  picker.type = "file";
  picker.accept = MESH_EXTENSIONS.join(",");
  picker.style.display = "none";
  picker.onchange = async () => {
    const file = picker.files?.[0];
    picker.value = "";
    if (!file) return;
    try {
      const path = await uploadMesh(file);
      if (!combo.options.values.includes(path)) combo.options.values.push(path);
      combo.value = path;
      combo.callback?.(path);
      node.setDirtyCanvas(true, true);
    } catch (error) {
      app.ui?.dialog?.show?.(`Load Mesh: ${error.message}`);
      console.warn("MPOD3D", error);
    }
  };
  document.body.append(picker);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    picker.remove();
    return onRemoved?.apply(this, arguments);
  };
  addButton(node, "upload mesh", () => picker.click());
}

function setupSaveMesh(node) {
  addButton(node, "download", () => {
    const saved = node.mpod3dLastSaved;
    if (!saved) {
      app.ui?.dialog?.show?.("Save Mesh: run the workflow first; the last saved file is downloaded.");
      return;
    }
    const params = new URLSearchParams({ filename: saved.filename, subfolder: saved.subfolder, type: saved.type });
    const link = document.createElement("a");
    link.href = api.apiURL(`/view?${params}`);
    link.download = saved.filename;
    document.body.append(link);
    link.click();
    link.remove();
  });
}

app.registerExtension({
  name: "mpod3d.nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "MPOD3D_SaveMesh") {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        const saved = output?.["3d"]?.[0];
        if (saved) this.mpod3dLastSaved = saved;
        return onExecuted?.apply(this, arguments);
      };
    }
  },
  nodeCreated(node) {
    const type = node.comfyClass ?? node.type ?? "";
    if (!type.startsWith(PREFIX)) return;
    node.color = NODE_COLOR;
    node.bgcolor = NODE_BGCOLOR;
    if (type === "MPOD3D_LoadMesh") setupLoadMesh(node);
    if (type === "MPOD3D_SaveMesh") setupSaveMesh(node);
  },
});
