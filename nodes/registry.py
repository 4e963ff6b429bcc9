"""Node ids, display names and categories: the one table the pack registers from.

This module imports nothing from ComfyUI so that tests and tools can read it
outside a server. Node ids are permanent (saved workflows refer to them).
"""
import logging

log = logging.getLogger(__name__)

CATEGORY = "MPOD3D"
MESH_CATEGORY = f"{CATEGORY}/mesh"
GUIDANCE_CATEGORY = f"{CATEGORY}/guidance"
MPOD123_CATEGORY = f"{CATEGORY}/mpod123"
REPARO_CATEGORY = f"{CATEGORY}/reparo"
THEMESTATION_CATEGORY = f"{CATEGORY}/themestation"

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
    "MPOD3D_MRCAAttentionPatch": "MRCA Attention Patch",
    "MPOD3D_CropObjects": "Crop Objects",
    "MPOD3D_OTLayoutAlign": "OT Layout Align",
    "MPOD3D_LoadSAM": "Load SAM Model",
    "MPOD3D_SAMSegmentObjects": "SAM Segment Objects",
    "MPOD3D_LoadDepthModel": "Load Depth Model",
    "MPOD3D_EstimateDepth": "Estimate Depth",
    "MPOD3D_TextualInversion": "Textual Inversion",
    "MPOD3D_DMTetRefine": "DMTet Refine",
    "MPOD3D_SaveDMTetState": "Save DMTet State",
    "MPOD3D_LoadDMTetState": "Load DMTet State",
    "MPOD3D_RenderExemplars": "Render Exemplars",
    "MPOD3D_ThemeFinetune": "Theme Finetune",
    "MPOD3D_DSDRefine": "DSD Refine",
    "MPOD3D_MeshDiversity": "Mesh Diversity",
    "MPOD3D_ConceptSimilarity": "Concept CLIP Similarity",
    "MPOD3D_SceneEvaluation": "Scene Evaluation",
}

#: node id -> menu category.
NODE_CATEGORIES = {
    **{node_id: MESH_CATEGORY for node_id in ("MPOD3D_LoadMesh", "MPOD3D_SaveMesh", "MPOD3D_RenderMeshViews",
                                              "MPOD3D_MeshToComfyMesh", "MPOD3D_ComfyMeshToMesh", "MPOD3D_MeshList",
                                              "MPOD3D_ComposeScene")},
    "MPOD3D_SDSImageFit": GUIDANCE_CATEGORY,
    **{node_id: MPOD123_CATEGORY for node_id in ("MPOD3D_Zero123SDSNeRF", "MPOD3D_OpacityMask", "MPOD3D_FieldToMesh",
                                                 "MPOD3D_SaveRadianceField", "MPOD3D_LoadRadianceField",
                                                 "MPOD3D_TextualInversion", "MPOD3D_MRCAAttentionPatch",
                                                 "MPOD3D_DMTetRefine", "MPOD3D_SaveDMTetState",
                                                 "MPOD3D_LoadDMTetState")},
    **{node_id: REPARO_CATEGORY for node_id in ("MPOD3D_CropObjects", "MPOD3D_OTLayoutAlign", "MPOD3D_LoadSAM",
                                                "MPOD3D_SAMSegmentObjects", "MPOD3D_LoadDepthModel",
                                                "MPOD3D_EstimateDepth")},
    "MPOD3D_RenderExemplars": THEMESTATION_CATEGORY,
    "MPOD3D_ThemeFinetune": THEMESTATION_CATEGORY,
    "MPOD3D_DSDRefine": THEMESTATION_CATEGORY,
    "MPOD3D_MeshDiversity": THEMESTATION_CATEGORY,
    "MPOD3D_ConceptSimilarity": THEMESTATION_CATEGORY,
    "MPOD3D_SceneEvaluation": REPARO_CATEGORY,
}

#: Custom type name of meshes travelling between nodes (trimesh.Trimesh objects, or a
#: trimesh.Scene of named objects), the name other popular 3D packs use, so their meshes plug in.
TRIMESH_TYPE = "TRIMESH"

#: Custom type name of radiance fields (mpod_core.fields.RadianceField objects).
RADIANCE_FIELD_TYPE = "RADIANCE_FIELD"

#: Custom type name of DMTet refine states (mpod_core.pipelines.dmtet_refine.RefineState objects).
DMTET_STATE_TYPE = "MPOD3D_DMTET_STATE"

#: Custom type name of Segment Anything models (segment_anything.modeling.Sam objects),
#: the name ComfyUI-Impact-Pack's SAMLoader uses, so SAM models plug in across packs.
SAM_MODEL_TYPE = "SAM_MODEL"

#: Custom type name of depth estimators (mpod_core.depth_estimation.DepthModel objects: a transformers
#: model with its processor's settings, which no other pack's type carries, hence the pack's prefix).
DEPTH_MODEL_TYPE = "MPOD3D_DEPTH_MODEL"


def registrable_nodes(nodes: list, display_names: dict[str, str]) -> list:
    """The node classes whose ``define_schema()`` builds and whose id is in ``display_names``, each
    id once, in order.

    Any other class is logged (a warning naming the class or id and why) and left out, so one broken
    or drifted node never takes the rest of the pack down with it. Ids of the table that no class
    has are logged too (workflows naming them show those nodes as missing).
    """
    kept, ids = [], set()
    for node in nodes:
        name = getattr(node, "__name__", repr(node))
        try:
            schema = node.define_schema()
            node_id = schema.node_id
            # ComfyUI validates every schema when the extension loads and one failure (e.g. an output id
            # repeating an input id) aborts the whole pack; checked here, only that node is left out.
            validate = getattr(schema, "validate", None)
            if callable(validate):
                validate()
        except Exception as exc:  # a KeyError here is usually an id missing from NODE_DISPLAY_NAMES
            log.warning("MPOD3D: node class %s not registered: define_schema raised %s: %s",
                        name, type(exc).__name__, exc, exc_info=True)
            continue
        if node_id not in display_names:
            log.warning("MPOD3D: node %s (class %s) not registered: its id is missing from "
                        "nodes/registry.py NODE_DISPLAY_NAMES", node_id, name)
        elif node_id in ids:
            log.warning("MPOD3D: node %s (class %s) not registered: another class has this id", node_id, name)
        else:
            ids.add(node_id)
            kept.append(node)
    for node_id in sorted(set(display_names) - ids):
        log.warning("MPOD3D: node %s is in nodes/registry.py NODE_DISPLAY_NAMES but no node class with "
                    "this id was registered (see any warning above)", node_id)
    return kept
