"""ComfyUI-MPOD3D: MPOD123, REPARO and ThemeStation as ComfyUI nodes.

ComfyUI imports this package from ``custom_nodes/`` and calls
``comfy_entrypoint`` (the V3 extension API), which registers every node in one
place (``nodes/extension.py``). Importing the package itself touches nothing:
no ComfyUI imports, downloads, sys.path edits or file writes, so tools such
as pytest can import it outside a server.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes.extension import MPOD3DExtension

    return MPOD3DExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
