"""Node ids, display names and categories: the one table the pack registers from.

This module imports nothing from ComfyUI so that tests and tools can read it
outside a server. Node ids are permanent (saved workflows refer to them).
"""

CATEGORY = "MPOD3D"
MESH_CATEGORY = f"{CATEGORY}/mesh"
GUIDANCE_CATEGORY = f"{CATEGORY}/guidance"
MPOD123_CATEGORY = f"{CATEGORY}/mpod123"
REPARO_CATEGORY = f"{CATEGORY}/reparo"

#: node id -> display name shown in ComfyUI's menus and on the node.
NODE_DISPLAY_NAMES = {
    "MPOD3D_LoadMesh": "Load Mesh",
    "MPOD3D_SaveMesh": "Save Mesh",
    "MPOD3D_RenderMeshViews": "Render Mesh Views",
    "MPOD3D_MeshToComfyMesh": "Mesh to ComfyUI MESH",
    "MPOD3D_ComfyMeshToMesh": "ComfyUI MESH to Mesh",
    "MPOD3D_MeshList": "Mesh List",
    "MPOD3D_ComposeScene": "Compose Scene",
    "MPOD3D_SDSImageFit": "SDS Image Fit",
    "MPOD3D_Zero123SDSNeRF": "Zero123 SDS NeRF",
    "MPOD3D_OpacityMask": "Opacity Mask",
    "MPOD3D_FieldToMesh": "Field to Mesh",
    "MPOD3D_SaveRadianceField": "Save Radiance Field",
    "MPOD3D_LoadRadianceField": "Load Radiance Field",
    "MPOD3D_CropObjects": "Crop Objects",
    "MPOD3D_OTLayoutAlign": "OT Layout Align",
    "MPOD3D_LoadSAM": "Load SAM Model",
    "MPOD3D_SAMSegmentObjects": "SAM Segment Objects",
}

#: node id -> menu category.
NODE_CATEGORIES = {
    **{node_id: MESH_CATEGORY for node_id in ("MPOD3D_LoadMesh", "MPOD3D_SaveMesh", "MPOD3D_RenderMeshViews",
                                              "MPOD3D_MeshToComfyMesh", "MPOD3D_ComfyMeshToMesh", "MPOD3D_MeshList",
                                              "MPOD3D_ComposeScene")},
    "MPOD3D_SDSImageFit": GUIDANCE_CATEGORY,
    **{node_id: MPOD123_CATEGORY for node_id in ("MPOD3D_Zero123SDSNeRF", "MPOD3D_OpacityMask", "MPOD3D_FieldToMesh",
                                                 "MPOD3D_SaveRadianceField", "MPOD3D_LoadRadianceField")},
    **{node_id: REPARO_CATEGORY for node_id in ("MPOD3D_CropObjects", "MPOD3D_OTLayoutAlign", "MPOD3D_LoadSAM",
                                                "MPOD3D_SAMSegmentObjects")},
}

#: Custom type name of meshes travelling between nodes (trimesh.Trimesh objects, or a
#: trimesh.Scene of named objects), the name other popular 3D packs use, so their meshes plug in.
TRIMESH_TYPE = "TRIMESH"

#: Custom type name of radiance fields (mpod_core.fields.RadianceField objects).
RADIANCE_FIELD_TYPE = "RADIANCE_FIELD"

#: Custom type name of Segment Anything models (segment_anything.modeling.Sam objects),
#: the name ComfyUI-Impact-Pack's SAMLoader uses, so SAM models plug in across packs.
SAM_MODEL_TYPE = "SAM_MODEL"
