"""How each rung is applied to a real pipeline, one technique per module. What each one is, needs
and costs, and when it is tried, is its row in :mod:`autofit.planning.rungs` (its terms in
:mod:`autofit.plan`); this package only does the work, looked up by those terms (a placement by
its scheme: ``placement.SCHEMES``)."""

from autofit.strategies.casting import apply_fp8
from autofit.strategies.placement import place, tear_down
from autofit.strategies.vae import UserVae, VaeSettings, configure_vae

__all__ = ["apply_fp8", "place", "tear_down", "UserVae", "VaeSettings", "configure_vae"]
