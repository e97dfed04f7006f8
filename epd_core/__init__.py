"""EPD-Solver core: plain PyTorch, no ComfyUI import.

Public API: :func:`load_params`, :func:`save_params` (failures raise :class:`EPDFileError`), :class:`EPDParams`
and its :class:`Decoded` values, :func:`make_schedule`, :func:`sample`, the exact test model
:class:`GaussianMixture`, and the published tables on request: :func:`load_catalogue`, :func:`find_entry`,
:func:`fetch` of a :class:`CatalogueEntry` (see each module's docstring). Training: :mod:`epd_core.distill`
(its objective: :mod:`epd_core.objective`), :mod:`epd_core.rdpo`
(its policy: :mod:`epd_core.policy`); their settings: :mod:`epd_core.config`.
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
