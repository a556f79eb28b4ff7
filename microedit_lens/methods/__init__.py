"""Editing methods. Each lives in its own module and registers itself; look them up by name with
:func:`get_method`."""

from microedit_lens.methods.base import EditMethod, MethodRegistry, get_method, register_method
from microedit_lens.methods.microedit import MicroEditConfig, MicroEditor

__all__ = ["EditMethod", "MethodRegistry", "get_method", "register_method", "MicroEditConfig", "MicroEditor"]
