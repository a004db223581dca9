"""How each strategy is applied to a real pipeline. What each one costs and saves, and when it is
tried, is declared in :mod:`autofit.ladder`; this package only does the work."""

from .casting import apply_fp8
from .placement import place, teardown
from .vae import UserVae, VaeSettings, configure_vae

__all__ = ["apply_fp8", "place", "teardown", "UserVae", "VaeSettings", "configure_vae"]
