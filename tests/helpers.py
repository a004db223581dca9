"""Helpers shared by the tests: the tiny pipelines, their call arguments, and small counters."""

import itertools

import torch

from autofit.testing import tiny_flux, tiny_sdxl

PROMPT = "a photo of an astronaut riding a horse"


def _sdxl():
    return tiny_sdxl()


def _flux():
    return tiny_flux()


BUILDERS = {"sdxl": _sdxl, "flux": _flux}
CALL_KWARGS = {
    "sdxl": dict(num_inference_steps=4, height=64, width=64, output_type="pt"),
    "flux": dict(num_inference_steps=4, height=32, width=32, output_type="pt", max_sequence_length=16),
}
DENOISER = {"sdxl": "unet", "flux": "transformer"}


def run(p, kind, seed=0, **extra):
    kwargs = dict(CALL_KWARGS[kind])
    kwargs.update(extra)
    return p(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


class CallCounter:
    """Counts completed forward calls of a real module (a post-hook runs only on success)."""

    def __init__(self, module, method="forward"):
        self.n = 0
        if method == "forward":
            self._h = module.register_forward_hook(lambda *a: self._inc())
        else:  # e.g. vae.decode: count through the decoder submodule
            self._h = module.decoder.register_forward_hook(lambda *a: self._inc())

    def _inc(self):
        self.n += 1

    def remove(self):
        self._h.remove()


# The fault matrix of test_reliability (its size goes in the report header).
STAGES = ["load", "encode", "denoise", "decode", "glue"]
START_PLANS = [(), ("offload_encoders",), ("offload_for_decode",), ("model_offload",), ("group_block",),
               ("group_leaf",), ("group_disk",), ("vae_tiling",), ("vae_cpu",)]
MATRIX = list(itertools.product(["sdxl", "flux"], START_PLANS, STAGES, ["first", "later"]))


# ---- the engine under test: built from its public seams, read through its objects -------------
# What only this suite needs (autofit.testing ships what users need). A proxy made by ``wrap``
# reads the machine through ``DialReadings``, whose two dials a test may turn.
from contextlib import contextmanager  # noqa: E402

from autofit.engine.readings import Readings  # noqa: E402
from autofit.engine.relax import Relaxation  # noqa: E402
from autofit.proxy import Options  # noqa: E402
from autofit.proxy import wrap as _wrap  # noqa: E402


class DialReadings(Readings):
    """The machine as autofit reads it, with two dials: ``judged``, the device type plans are
    judged for (None: the real one), and ``ram_cap``, the host RAM cap (``max_ram``) now."""

    def __init__(self, device, *, max_vram=None, max_ram=None):
        super().__init__(device, max_vram=max_vram, max_ram=max_ram)
        self.judged: str | None = None
        self.ram_cap = max_ram

    @property
    def judged_type(self) -> str:
        return self.judged or super().judged_type

    @property
    def max_ram(self):
        return self.ram_cap


def paced(first_wait, max_wait, probe_share=1.0):
    """Probes back down after ``first_wait`` successful calls, doubling to ``max_wait`` after each
    failed one; failed probes may take ``probe_share`` of the run time (1.0: no time limit, so a
    test's outcome does not hang on how busy the machine is)."""
    return Relaxation(first_wait=first_wait, max_wait=max_wait, probe_share=probe_share)


def wrap(pipe, *, probes=None, **options):
    """``autofit(pipe, **options)`` reading the machine through ``DialReadings``; ``probes``: a
    ``Relaxation`` pacing the probes back down (see ``paced``)."""
    opts = Options.parse(pipe, **options)
    readings = DialReadings(opts.device, max_vram=opts.max_vram, max_ram=opts.max_ram)
    return _wrap(pipe, opts, readings=readings, relaxation=probes)


def engine(proxy):
    """The runtime behind a proxy (read its objects; change them through their methods)."""
    return proxy._self_runtime


def dials(proxy) -> DialReadings:
    readings = engine(proxy).readings
    if not isinstance(readings, DialReadings):
        raise TypeError("build the proxy with helpers.wrap(pipe, ...) to turn its dials")
    return readings


@contextmanager
def judged_as(proxy, device_type):
    """The rung table, the ladder and the planner judge ``proxy``'s plans as on a
    ``device_type`` machine, while the rungs still run where the pipeline is: for CPU tests of
    rungs a CPU would refuse (streams, partial residency)."""
    readings = dials(proxy)
    before, readings.judged = readings.judged, device_type
    try:
        yield
    finally:
        readings.judged = before


def switch_plan(proxy, plan):
    """Switch ``proxy`` to ``plan`` now, as an escalation would (weights placed, one-way rungs
    applied or undone). Raises ``torch.OutOfMemoryError`` if placing the weights ran out; a
    failure that is not an OOM passes through with the previous plan in force."""
    rt = engine(proxy)
    with rt.lock:
        failure = rt.placement.switch(plan)
    if failure is not None:
        raise torch.OutOfMemoryError(f"while placing {plan}: {failure.head}")


def forget_placement(proxy):
    """Make the next call place the weights again (a ``load`` stage), as after an exhaustion."""
    rt = engine(proxy)
    with rt.lock:
        rt.placement.forget()


def mark_broken(proxy, rung, components):
    """Record that ``rung`` broke ``components``, as a roll back (or the plan cache) would."""
    rt = engine(proxy)
    with rt.lock:
        rt.placement.mark_broken(rung, components)


def rung_context(proxy):
    """What the rung table, the ladder and the planner judge ``proxy``'s plans against now."""
    rt = engine(proxy)
    with rt.lock:
        return rt.context()


def host_room(proxy):
    """(host RAM, pinned host RAM) a plan of ``proxy`` may hold now."""
    rt = engine(proxy)
    with rt.lock:
        return rt.survey.host_room()


def measured_activations(proxy):
    """Activation bytes per stage learned for the workload of the last call."""
    rt = engine(proxy)
    with rt.lock:
        return rt.measurements.measured(rt.choice.key if rt.choice is not None else None) or {}


def one_way_rungs(proxy):
    """component -> the one-way storage rung applied to it (``.rung``, ``.undo``)."""
    rt = engine(proxy)
    with rt.lock:
        return dict(rt.placement.ledger.entries)


def placed_plan(proxy):
    """The plan the weights are placed for now; None: the next call places them first."""
    rt = engine(proxy)
    with rt.lock:
        return rt.placement.applied
