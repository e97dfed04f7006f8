"""EPD-Solver for ComfyUI: entry point (V3 API)."""

from comfy_api.latest import ComfyExtension, io


class EPDExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .nodes.epd_nodes import register_folder

        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes.epd_nodes import NODES, register_folder

        register_folder()
        return list(NODES)


async def comfy_entrypoint() -> EPDExtension:
    return EPDExtension()
