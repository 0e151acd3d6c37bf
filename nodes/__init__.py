"""ComfyUI nodes of the pack (V1 API): one module per concern, each exporting its mapping dicts.

Node ids are public names stored in every workflow: never rename them.
"""

from . import dataset_nodes, evaluation_nodes, inversion_nodes, loader_nodes, norm_stats_nodes, prompt_nodes, tuning_nodes

MODULES = (dataset_nodes, inversion_nodes, tuning_nodes, norm_stats_nodes, prompt_nodes, evaluation_nodes, loader_nodes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
