"""EPD-Solver for ComfyUI: entry point (V3 API, ``comfy_entrypoint``).

ComfyUI is imported only when ComfyUI calls the entry point, so the package
(and its plain-PyTorch core, ``epd_core``) also imports without ComfyUI.
The nodes live in ``nodes/nodes_<feature>.py``, each module listing its own in ``NODES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_api.latest import ComfyExtension

WEB_DIRECTORY = "./web"  # the frontend's part: workflows saved by earlier versions load onto today's widgets


async def comfy_entrypoint() -> ComfyExtension:
    from comfy_api.latest import ComfyExtension

    from .nodes import nodes_demo, nodes_mnist, nodes_sampling, nodes_tables, nodes_training
    from .nodes.nodes_tables import register_folder

    class EPDExtension(ComfyExtension):
        async def on_load(self) -> None:
            register_folder()

        async def get_node_list(self) -> list:
            register_folder()
            nodes = (nodes_tables, nodes_sampling, nodes_training, nodes_demo, nodes_mnist)
            return [node for module in nodes for node in module.NODES]

    return EPDExtension()
