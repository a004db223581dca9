"""Footprints of the real SDXL and Flux pipelines, as measured on an H200 (gpu-facts.md), for the
pure planner tests. Leaf/block sizes and counts are from the published architectures."""

from autofit.facts.footprint import ComponentFootprint, Footprint
from autofit.facts.components import role_of

GIB = 2**30


def _c(name, gib, leaf_mib, block_gib, lc_gib, leaves, dtype="float16", fp8_ok=True, cls="X", quant=None, pin=1.5):
    """``quant``: (nf4 GiB, int8 GiB) for quantization targets; these, the fp8 sizes and ``pin`` (pinned
    size / size) are what autofit.facts.footprint.measure reports for benchmarks/sized.py's pipelines
    (built on the meta device)."""
    nf4, int8 = quant or (gib, gib)
    return ComponentFootprint(name, role_of(name), cls, int(gib * GIB), int(leaf_mib * 2**20),
                              int(block_gib * GIB), int(lc_gib * GIB), fp8_ok, leaves, dtype,
                              quant is not None, int(nf4 * GIB), int(int8 * GIB), pinned_bytes=int(pin * gib * GIB))


def fp(*components):
    return Footprint({c.name: c for c in components})


SDXL = fp(
    _c("unet", 4.78, 50, 0.5, 2.39, 1700, quant=(1.79, 2.70), pin=1.31),
    _c("text_encoder_2", 1.29, 50, 0.04, 1.29, 200, fp8_ok=False, quant=(0.45, 0.71), pin=1.26),
    _c("text_encoder", 0.23, 75, 0.01, 0.23, 100, fp8_ok=False, pin=1.77),
    _c("vae", 0.16, 10, 0.16, 0.16, 100, fp8_ok=False, pin=1.75),
)
FLUX = fp(
    _c("transformer", 22.17, 100, 0.6, 14.11, 1000, "bfloat16", quant=(6.24, 11.09), pin=1.56),
    _c("text_encoder_2", 8.87, 100, 0.3, 4.56, 300, "bfloat16", fp8_ok=False, cls="T5EncoderModel", quant=(2.67, 4.56),
       pin=1.37),
    _c("text_encoder", 0.23, 75, 0.01, 0.23, 100, "bfloat16", fp8_ok=False, pin=1.77),
    _c("vae", 0.16, 10, 0.16, 0.16, 100, "bfloat16", fp8_ok=False, pin=1.75),
)
