"""One-way rungs (fp8 storage) are validated on first use and rolled back when they break."""

import json

import torch

from autofit import autofit
from autofit.testing import tiny_sdxl

from helpers import run

DTYPE_ERROR = "expected mat1 and mat2 to have the same dtype, but got: c10::Float8_e4m3fn != c10::BFloat16"


def _break_under_fp8(module):
    """Make ``module`` fail the way T5 does under fp8 storage (it casts activations to the weight
    dtype inside forward): a real RuntimeError, only while its weights are stored in fp8."""

    def check(mod, args):
        if mod.weight.dtype == torch.float8_e4m3fn:
            raise RuntimeError(DTYPE_ERROR)

    return module.register_forward_pre_hook(check)


def test_a_component_broken_by_fp8_is_restored_and_the_call_succeeds(tmp_path):
    """fp8 breaks the UNet: its original weights come back bit for bit, the plan drops fp8, the
    call returns the image of a clean fp32 run, and the plan cache marks fp8 broken for it."""
    original = {k: v.clone() for k, v in tiny_sdxl().unet.state_dict().items()}
    reference = run(autofit(tiny_sdxl(), cache=False), "sdxl")
    pipe = tiny_sdxl()
    handle = _break_under_fp8(pipe.unet.time_embedding.linear_1)
    proxy = autofit(pipe, plan=("fp8",), cache=tmp_path, policy="speed")
    image = run(proxy, "sdxl")
    handle.remove()
    rec = proxy.autofit.history[-1]
    assert (rec.action, rec.component, rec.stage) == ("undo_fp8", "unet", "denoise")
    assert DTYPE_ERROR[:40] in rec.error
    assert "fp8" not in proxy.autofit.plan
    for key, value in pipe.unet.state_dict().items():
        assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key
    torch.testing.assert_close(image, reference)


def test_fp8_marked_broken_is_not_tried_again(tmp_path):
    """After the rollback, a denoise OOM skips fp8 with the reason, in this process and the next."""
    pipe = tiny_sdxl()
    handle = _break_under_fp8(pipe.unet.time_embedding.linear_1)
    first = autofit(pipe, plan=("fp8",), cache=tmp_path, policy="speed", max_vram="64GiB")
    run(first, "sdxl")
    handle.remove()
    records = [json.loads(p.read_text()) for p in (tmp_path / "plans").glob("*.json")]
    assert any(r.get("broken") == {"fp8": ["unet"]} for r in records)
    from autofit.testing import inject_oom

    import structlog

    second = autofit(tiny_sdxl(), cache=tmp_path, policy="speed", max_vram="64GiB", device="cpu")
    with inject_oom(second, stage="denoise", times=100), structlog.testing.capture_logs() as logs:
        try:
            run(second, "sdxl")
        except torch.OutOfMemoryError:
            pass
    reasons = [e["reason"] for e in logs if e["event"] == "autofit.rung_skipped" and e["action"] == "fp8"]
    assert "fp8" not in [r.action for r in second.autofit.history]
    assert reasons and reasons[-1].startswith("fp8 broke unet before")


def test_non_oom_errors_after_validation_pass_through():
    """Once a cast component has run, a later non-OOM error is the user's: it propagates."""
    pipe = tiny_sdxl()
    proxy = autofit(pipe, plan=("fp8",), cache=False, policy="speed")
    run(proxy, "sdxl")  # validated
    handle = _break_under_fp8(pipe.unet.time_embedding.linear_1)
    try:
        run(proxy, "sdxl")
        raised = None
    except RuntimeError as exc:
        raised = exc
    handle.remove()
    assert raised is not None and DTYPE_ERROR in str(raised)
    assert "fp8" in proxy.autofit.plan
