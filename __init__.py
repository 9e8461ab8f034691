"""ComfyUI-XPortrait: X-Portrait portrait animation as ComfyUI nodes.

ComfyUI imports this folder as a package (by path, from custom_nodes/) and reads NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS. Importing it is cheap and never fails for want of torch or ComfyUI: the nodes import
the `xportrait_core` networks only when they run.
"""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bind_core() -> None:
    """Make `import xportrait_core` find the core that sits beside these nodes.

    ComfyUI does not put custom node folders on sys.path. Binding the package by its path (instead of adding this
    folder to sys.path) keeps the rest of this folder (nodes/, tests/) from shadowing modules of the same names.
    """
    if "xportrait_core" in sys.modules:
        return
    init = os.path.join(_HERE, "xportrait_core", "__init__.py")
    spec = importlib.util.spec_from_file_location("xportrait_core", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["xportrait_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["xportrait_core"]
        raise


_bind_core()

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module named "__init__": pytest does this (in its default import mode) to the root of a
    # checkout whose folder name is not a Python identifier, e.g. "ComfyUI-XPortrait". Relative imports need a
    # package, so load this folder as one under a fixed name and re-export its mappings.
    def _as_package():
        name = "comfyui_xportrait"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, __file__, submodule_search_locations=[_HERE])
            package = importlib.util.module_from_spec(spec)
            sys.modules[name] = package
            spec.loader.exec_module(package)
        return sys.modules[name]

    NODE_CLASS_MAPPINGS = _as_package().NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS = _as_package().NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
