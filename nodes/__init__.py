"""ComfyUI nodes of the pack: thin wrappers that translate ComfyUI values into
``mpod_core`` calls. ``registry`` holds the node ids and display names and
imports nothing from ComfyUI, so tests can read it without a server."""
