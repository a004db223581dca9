"""Header-only model folders at the published sizes: configs plus safetensors files whose headers
state the real shapes, their data regions left sparse (no disk is used for them). ``autofit plan``
reads only headers, so these stand in for SDXL and Flux checkpoints without a download.

    python benchmarks/header_folder.py flux /tmp/flux-sized
    autofit plan /tmp/flux-sized --vram 24GiB --ram 128GiB --steps 28
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_header_only(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """A safetensors file with a real header and a sparse data region; returns the data bytes."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # sparse: never written
    return offset


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries, a tied tensor once (as save_pretrained stores it)."""
    seen, out = set(), {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def write_folder(kind: str, root: "str | Path") -> Path:
    """The ``sdxl`` or ``flux`` sized pipeline (benchmarks/sized.py, built on the meta device) as
    a header-only diffusers folder at ``root``."""
    import sized

    pipe = (sized.sdxl_sized if kind == "sdxl" else sized.flux_sized)(device="meta")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": "0.0"}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        library = type(comp).__module__.split(".")[0]
        index[name] = [library, type(comp).__name__]
        if not isinstance(comp, torch.nn.Module):
            continue
        folder = root / name
        folder.mkdir(exist_ok=True)
        config = comp.config.to_dict() if hasattr(comp.config, "to_dict") else dict(comp.config)
        (folder / "config.json").write_text(json.dumps(config, default=str, indent=1))
        weights = "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
        write_header_only(folder / weights, _unique_state(comp))
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("sdxl", "flux"):
        sys.exit("usage: header_folder.py {sdxl,flux} OUT_DIR")
    print(write_folder(sys.argv[1], sys.argv[2]))
