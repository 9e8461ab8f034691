"""The X-Portrait ComfyUI nodes, one module per node group; each module declares its own mappings."""
from . import common, identity, loader, lora, motion, native, paste_back, reference, sampling, video_writer

common.register_model_folder()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (loader, lora, reference, motion, sampling, native, identity, paste_back, video_writer):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
