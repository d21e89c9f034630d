"""LCM Nodes: Latent Consistency Models for ComfyUI.

Importing this package does nothing heavy: ComfyUI calls :func:`comfy_entrypoint`, which imports the node
classes. No downloads, installs or model loads happen at import.
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"  # web/docs/<NodeId>.md: the help page ComfyUI's frontend shows for each node


async def comfy_entrypoint():
    from .nodes import LCMExtension

    return LCMExtension()
