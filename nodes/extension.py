"""The pack's ComfyUI extension: the one list of nodes it registers."""
from comfy_api.latest import ComfyExtension, io

from . import (depth_nodes, dsd_nodes, mesh_nodes, metrics_nodes, mrca_nodes, nerf_nodes, refine_nodes, reparo_nodes,
               sam_nodes, sds_nodes, textual_inversion_nodes, themestation_nodes)
from .registry import NODE_DISPLAY_NAMES, registrable_nodes

#: Every node of the pack, gathered from the per-topic modules.
NODE_LIST: list[type[io.ComfyNode]] = [*mesh_nodes.NODES, *sds_nodes.NODES, *nerf_nodes.NODES, *reparo_nodes.NODES,
                                      *sam_nodes.NODES, *depth_nodes.NODES, *textual_inversion_nodes.NODES,
                                      *mrca_nodes.NODES, *refine_nodes.NODES, *themestation_nodes.NODES,
                                      *dsd_nodes.NODES, *metrics_nodes.NODES]


class MPOD3DExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # A drifted id or a schema that raises costs that node only (logged), never the whole pack.
        return registrable_nodes(NODE_LIST, NODE_DISPLAY_NAMES)
