"""How each strategy is applied to a real pipeline. What each one costs and saves, and when it is
tried, is declared in :mod:`autofit.planning.ladder`; this package only does the work."""

from autofit.strategies.casting import apply_fp8
from autofit.strategies.placement import place, teardown
from autofit.strategies.vae import UserVae, VaeSettings, configure_vae

__all__ = ["apply_fp8", "place", "teardown", "UserVae", "VaeSettings", "configure_vae"]
