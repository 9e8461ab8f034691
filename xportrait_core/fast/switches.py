"""The fast paths read their switches from the one switch table, `xportrait_core/switches.py` (kept there, outside
`fast/`, because the model's attention dispatch reads it too and model files import nothing from `fast/`)."""
from ..switches import OFF, SWITCHES, setting, switched_on

__all__ = ["OFF", "SWITCHES", "setting", "switched_on"]
