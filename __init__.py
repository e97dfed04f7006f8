"""EPD-Solver for ComfyUI: entry point (V3 API, ``comfy_entrypoint``).

ComfyUI is imported only when ComfyUI calls the entry point, so the package
(and its plain-PyTorch core, ``epd_core``) also imports without ComfyUI.
"""


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes.epd_nodes import NODES, register_folder

    class EPDExtension(ComfyExtension):
        async def on_load(self) -> None:
            register_folder()

        async def get_node_list(self) -> list:
            register_folder()
            return list(NODES)

    return EPDExtension()
