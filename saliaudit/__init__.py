"""saliaudit: audit whether the saliency maps of a PyTorch image classifier can be trusted."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SaliauditError  # noqa: E402
from .methods.fullgrad import FullGradients, full_gradients  # noqa: E402
from .model import LoadedModel, load_model  # noqa: E402

__all__ = ["__version__", "SaliauditError", "FullGradients", "LoadedModel", "full_gradients",
           "load_model"]
