"""Node ids, display names and categories: the one table the pack registers from.

This module imports nothing from ComfyUI so that tests and tools can read it
outside a server. Node ids are permanent (saved workflows refer to them).
"""

CATEGORY = "MPOD3D"
MESH_CATEGORY = f"{CATEGORY}/mesh"
GUIDANCE_CATEGORY = f"{CATEGORY}/guidance"

#: node id -> display name shown in ComfyUI's menus and on the node.
NODE_DISPLAY_NAMES = {
    "MPOD3D_LoadMesh": "Load Mesh",
    "MPOD3D_SaveMesh": "Save Mesh",
    "MPOD3D_RenderMeshViews": "Render Mesh Views",
    "MPOD3D_MeshToComfyMesh": "Mesh to ComfyUI MESH",
    "MPOD3D_ComfyMeshToMesh": "ComfyUI MESH to Mesh",
    "MPOD3D_SDSImageFit": "SDS Image Fit",
}

#: Custom type name of meshes travelling between nodes (trimesh.Trimesh objects),
#: the name other popular 3D packs use, so their meshes plug in.
TRIMESH_TYPE = "TRIMESH"
