"""microedit-lens: lifelong knowledge editing with a switched, editable TopK SAE (MicroEdit) on
TransformerLens / SAELens hooked models."""

from microedit_lens.methods import EditMethod, MicroEditConfig, MicroEditor, get_method, register_method
from microedit_lens.models import DEFAULT_MODEL, ModelLoadError, load_model
from microedit_lens.sae import SAECompatibilityError, load_sae
from microedit_lens.switch import SwitchedSAE, SwitchMode
from microedit_lens.types import EditError, EditRequest, EditResult, NumericalEditError

__all__ = [
    "DEFAULT_MODEL", "EditError", "EditMethod", "EditRequest", "EditResult", "MicroEditConfig", "MicroEditor",
    "ModelLoadError", "NumericalEditError", "SAECompatibilityError", "SwitchMode", "SwitchedSAE", "get_method",
    "load_model", "load_sae", "register_method",
]
__version__ = "0.1.0"
