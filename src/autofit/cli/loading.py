"""Loading the pipeline in MODEL_DIR, for ``run`` and ``batch`` (the one slow step: every check of
the command comes before it)."""

from __future__ import annotations

import argparse
from typing import Any

from autofit.cli.args import UsageError
from autofit.cli.terminal import hush_loading_bars


def load_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline in MODEL_DIR, in --dtype (the checkpoint's own dtypes when not given)."""
    import torch
    from diffusers import DiffusionPipeline

    from autofit import _diffusers

    hush_loading_bars()  # diffusers reads its bar setting at import: just now, maybe
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, None: None}[args.dtype]
    try:
        return DiffusionPipeline.from_pretrained(args.model_dir, **_diffusers.dtype_kwargs(dtype))
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{args.model_dir}: cannot load the pipeline ({type(exc).__name__}: {first})") from None
