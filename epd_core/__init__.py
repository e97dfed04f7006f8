"""EPD-Solver core: plain PyTorch, no ComfyUI import.

Public API: :func:`load_params`, :func:`save_params`, :class:`EPDParams`,
:func:`make_schedule`, :func:`sample`, and the published tables on request:
:func:`load_catalogue`, :func:`find_entry`, :func:`fetch` (see each module's docstring).
"""

__version__ = "0.1.0"

from .analytic import GaussianMixture
from .catalogue import CatalogueEntry, fetch, find_entry, load_catalogue
from .files import EPDFileError, load_params, save_params
from .params import Decoded, EPDParams
from .schedules import make_schedule
from .solver import sample

__all__ = [
    "__version__",
    "EPDFileError",
    "EPDParams",
    "Decoded",
    "GaussianMixture",
    "load_params",
    "save_params",
    "make_schedule",
    "sample",
    "CatalogueEntry",
    "load_catalogue",
    "find_entry",
    "fetch",
]
