"""Measured weight sizes of a pipeline's components (the guide's S_total, S_max, S_block, S_leaf,
and the sizes after fp8 layerwise casting), read from the loaded modules."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autofit import _diffusers
from autofit.facts.checkpoint import Checkpoint, read_safetensors_header
from autofit.facts.components import role_of, roles
from autofit._diffusers import module_components
from autofit.plan import storing

# The module types fp8 layerwise casting really casts, and the name patterns it skips by default
# (norms, embeddings, in/out projections), are diffusers' own: _diffusers.layerwise_casting_defaults.
# Layers left in their dtype by quantization: embeddings and the pipeline-facing in/out
# projections only. Unlike fp8 casting, the Linear layers of AdaLN norms ("norm1.linear") are
# quantized, as diffusers' bitsandbytes loader does (on Flux they hold ~30% of the weights;
# leaving them out kept a Flux-sized nf4 transformer at 13 GiB instead of ~7, measured on an H200).
QUANT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$")
# Encoders that cast activations to the weight dtype inside forward: fp8 storage breaks them
# (measured on an H200: "expected mat1 and mat2 to have the same dtype ... Float8_e4m3fn").
FP8_INCOMPATIBLE = ("T5EncoderModel", "UMT5EncoderModel", "T5Model", "MT5EncoderModel")
# Text encoders quantized beside the denoiser whatever their size (the guide: LLM/T5 encoders are
# first-class quantization targets); any other encoder only above QUANT_MIN_ENCODER_BYTES.
QUANT_ENCODER_FAMILIES = ("T5", "UMT5", "MT5", "Qwen", "Llama", "Gemma", "Mistral", "Glm", "Phi")
QUANT_MIN_ENCODER_BYTES = 2**30
# Bytes per weight after bitsandbytes quantization: nf4 packs two weights a byte plus one fp32
# absmax per 64-weight block; LLM.int8 stores one byte a weight plus one fp32 scale per row.
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64
INT8_BYTES_PER_WEIGHT = 1.0


def _fp8_ok(role: str | None, class_name: str, saved: int) -> bool:
    """Only denoisers are stored in fp8. Text encoders from transformers report their dtype from
    their first parameter, which fp8 storage changes; pipelines then cast prompt embeddings (and
    draw latents) in fp8 and fail (seen on the CPU: "normal_kernel_cpu not implemented for
    Float8_e4m3fn"). T5-family encoders also cast activations to the weight dtype inside forward
    (measured on an H200)."""
    return role == "denoise" and class_name not in FP8_INCOMPATIBLE and saved > 0


def _quant_ok(role: str | None, class_name: str, linear_numel: int, total: int) -> bool:
    if linear_numel == 0:
        return False
    if role == "denoise":
        return True
    return role == "encode" and (class_name.startswith(QUANT_ENCODER_FAMILIES) or total > QUANT_MIN_ENCODER_BYTES)


def _quant_fields(role: str | None, class_name: str, total: int, linear_bytes: int, linear_numel: int) -> dict:
    """quant_ok and the sizes after nf4 / int8: only the quantizable Linear weights shrink."""
    rest = total - linear_bytes
    return {"quant_ok": _quant_ok(role, class_name, linear_numel, total),
            "nf4_bytes": rest + int(linear_numel * NF4_BYTES_PER_WEIGHT),
            "int8_bytes": rest + int(linear_numel * INT8_BYTES_PER_WEIGHT)}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pinned_size(nbytes: int) -> int:
    """Bytes one tensor takes in page-locked memory: torch's caching host allocator rounds every
    block up to the next power of two (``torch.cuda.host_memory_stats`` says so). Summed over
    the tensors of an SDXL-sized pipeline this gives 8.58 GiB for 6.46 GiB of weights; the pinned
    copies of leaf-level group offload with streams measured +8.6 GiB on an H200."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


@dataclass(frozen=True, slots=True)
class ComponentFootprint:
    name: str
    role: str | None
    class_name: str
    bytes: int
    leaf_bytes: int  # largest single leaf module (S_leaf)
    block_bytes: int  # largest block of a top-level ModuleList (S_block); the whole module if none
    cast_bytes: int  # size after fp8 layerwise casting (S_lc), castable or not
    fp8_ok: bool
    leaf_count: int = 1  # modules that hold weights: leaf-level offload moves each separately
    dtype: str = "float32"
    # bitsandbytes quantization: only the Linear weights (norms, embeddings and in/out projections
    # skipped, as for fp8) are quantized; the rest keeps its dtype.
    quant_ok: bool = False
    nf4_bytes: int = 0
    int8_bytes: int = 0
    # Loaded from a folder whose safetensors hold every tensor a one-way rung changes: undoing the
    # rung reads them back from disk, so no copy is kept in host RAM (see checkpoint.py).
    restorable: bool = False
    # Page-locked bytes a pinned copy of every tensor takes (each rounded up; see pinned_size).
    pinned_bytes: int = 0
    # A VAE's channels at full resolution (``block_out_channels[0]``): its decode activations scale
    # with it (SDXL's, Flux's and SD3's VAEs: 128). None: not known, taken as 128.
    feature_width: int | None = None

    def pinned_stored(self, storage: str | None) -> int:
        """Pinned size of the component's tensors under a storage rung (scaled with the weights;
        halving a tensor halves its rounded size). Footprints made without it count 1.5x."""
        stored = self.stored_bytes(storage)
        if not self.pinned_bytes or not self.bytes:
            return int(1.5 * stored)
        return int(self.pinned_bytes * stored / self.bytes)

    def stored_bytes(self, storage: str | None) -> int:
        """Size under a weight-storage rung (fp8 / int8 / nf4) that applies to this component."""
        terms = storing(storage)
        return getattr(self, terms.size) if terms and getattr(self, terms.targets) else self.bytes

    def stored_by(self, storage: str | None) -> bool:
        terms = storing(storage)
        return bool(terms and getattr(self, terms.targets))


@dataclass(frozen=True, slots=True)
class Footprint:
    components: dict[str, ComponentFootprint] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components.values())

    @property
    def largest(self) -> int:
        return max((c.bytes for c in self.components.values()), default=0)

    def by_role(self, role: str) -> list[ComponentFootprint]:
        return [c for c in self.components.values() if c.role == role]


def skipped_layer(qualified_name: str, patterns: tuple[str, ...] = QUANT_SKIP_PATTERNS) -> bool:
    """Whether a layer is left in its dtype (patterns searched in the qualified name, as diffusers does)."""
    return any(re.search(p, qualified_name) for p in patterns)


def _fp8_patterns(module: "torch.nn.Module | type | None") -> tuple[str, ...]:
    """diffusers' enable_layerwise_casting: its default patterns plus the model class's own and
    the modules it keeps in fp32. Takes a module or a model class (for a folder's headers)."""
    return _diffusers.layerwise_casting_defaults()[1] + _diffusers.model_fp8_skip_patterns(module)



def quant_targets(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers bitsandbytes quantization swaps, by qualified name."""
    return [(n, m) for n, m in module.named_modules()
            if type(m) is torch.nn.Linear and m.weight.is_floating_point() and not skipped_layer(n)]


def fp8_cast_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters fp8 layerwise casting stores in fp8 (state-dict keys), as diffusers selects them."""
    skip = _fp8_patterns(module)
    castable = _diffusers.layerwise_casting_defaults()[0]
    return [(f"{n}.{pn}" if n else pn, p)
            for n, m in module.named_modules() if isinstance(m, castable) and not skipped_layer(n, skip)
            for pn, p in m.named_parameters(recurse=False) if p.is_floating_point() and p.element_size() > 1]


def _own_bytes(module: torch.nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in module.parameters(recurse=False)) + sum(
        _tensor_bytes(b) for b in module.buffers(recurse=False)
    )


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(_tensor_bytes(p) for p in module.parameters()) + sum(_tensor_bytes(b) for b in module.buffers())


def measure_component(name: str, module: torch.nn.Module, role: str | None = None) -> ComponentFootprint:
    total = _module_bytes(module)
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    pinned = sum(pinned_size(_tensor_bytes(t)) for t in tensors.values())
    leaf = max((_own_bytes(m) for m in module.modules()), default=0)
    blocks = [
        _module_bytes(block)
        for child in module.children()
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
        for block in child
    ]
    cast = fp8_cast_params(module)
    linear = [(f"{n}.weight", m.weight) for n, m in quant_targets(module)]
    saved = sum(p.numel() * (p.element_size() - 1) for _, p in cast)
    linear_bytes = sum(_tensor_bytes(w) for _, w in linear)
    linear_numel = sum(w.numel() for _, w in linear)
    # Whether the checkpoint the module came from holds every tensor a one-way rung would change
    # (headers only; the contents are compared when the rung is applied).
    source = Checkpoint.of(module)
    restorable = source is not None and bool(cast or linear) and source.covers(cast + linear)
    cls = type(module).__name__
    role = role or role_of(name, module)
    dtypes = [p.dtype for p in module.parameters()]
    dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    return ComponentFootprint(
        name=name,
        role=role,
        class_name=cls,
        bytes=total,
        leaf_bytes=leaf,
        block_bytes=max(blocks) if blocks else total,
        cast_bytes=total - saved,
        fp8_ok=_fp8_ok(role, cls, saved),
        leaf_count=sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False))),
        dtype=str(dtype).replace("torch.", ""),
        restorable=restorable,
        pinned_bytes=pinned,
        feature_width=_feature_width(module) if role == "decode" else None,
        **_quant_fields(role, cls, total, linear_bytes, linear_numel),
    )


def _feature_width(module: torch.nn.Module) -> int | None:
    channels = getattr(getattr(module, "config", None), "block_out_channels", None)
    if isinstance(channels, (list, tuple)) and channels and isinstance(channels[0], int) and channels[0] > 0:
        return channels[0]
    return None


def measure(pipe: Any) -> Footprint:
    stage = roles(pipe)
    return Footprint({n: measure_component(n, m, stage[n]) for n, m in module_components(pipe).items()})


# ---- from a model folder, without loading weights ------------------------------------------
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _castable_name(name: str, shape: list[int], patterns: tuple[str, ...]) -> bool:
    module = name.rsplit(".", 1)[0]
    if not name.endswith(".weight") or len(shape) < 2:
        return False
    return not skipped_layer(module, patterns) and "embed" not in module


def footprint_from_header(
    name: str, header: dict, class_name: str, dtype_override: str | None = None, restorable: bool = False
) -> ComponentFootprint:
    """S, S_leaf, S_block and S_lc of one component from its safetensors header (approximate: layer
    types are inferred from names and shapes, not from modules)."""
    total = leaf_max = saved = linear_bytes = linear_numel = pinned = 0
    fp8_skip = _fp8_patterns(_diffusers.model_class(class_name))
    leaves: dict[str, int] = {}
    blocks: dict[str, int] = {}
    dtypes: dict[str, int] = {}
    for tname, meta in header.items():
        dt, shape = meta["dtype"], meta["shape"]
        per = _DTYPE_BYTES.get(dt, 2)
        if dtype_override is not None and dt in ("F32", "F16", "BF16"):
            per = 4 if dtype_override == "float32" else 2
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * per
        total += nbytes
        pinned += pinned_size(nbytes)
        dtypes[dt] = dtypes.get(dt, 0) + nbytes
        prefix = tname.rsplit(".", 1)[0]
        leaves[prefix] = leaves.get(prefix, 0) + nbytes
        parts = tname.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            key = ".".join(parts[:2])
            blocks[key] = blocks.get(key, 0) + nbytes
        if _castable_name(tname, shape, fp8_skip) and per > 1:
            saved += numel * (per - 1)
        if len(shape) == 2 and per > 1 and _castable_name(tname, shape, QUANT_SKIP_PATTERNS):
            linear_bytes += nbytes  # a Linear weight (conv weights have 3+ dims)
            linear_numel += numel
    leaf_max = max(leaves.values(), default=0)
    main = max(dtypes, key=dtypes.get) if dtypes else "F32"
    role = role_of(name, class_name=class_name)
    return ComponentFootprint(
        name=name,
        role=role,
        class_name=class_name,
        bytes=total,
        leaf_bytes=leaf_max,
        block_bytes=max(blocks.values(), default=total),
        cast_bytes=total - saved,
        fp8_ok=_fp8_ok(role, class_name, saved),
        leaf_count=len(leaves),
        dtype=dtype_override or _DTYPE_NAMES.get(main, main.lower()),
        restorable=restorable,
        pinned_bytes=pinned,
        **_quant_fields(role, class_name, total, linear_bytes, linear_numel),
    )


_TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                         torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                         torch.float8_e5m2: "F8_E5M2"}


def _pickled_header(files: list[Path]) -> dict:
    """A safetensors-like header of PyTorch .bin checkpoints: loaded onto the meta device, so
    only shapes and dtypes are read, not the weights (weights_only: no code runs)."""
    header: dict = {}
    for f in files:
        try:
            state = torch.load(f, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(f, map_location="meta", weights_only=True)
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                header[key] = {"dtype": _TORCH_TO_SAFETENSORS.get(t.dtype, "F16"), "shape": list(t.shape)}
    return header


# Files a component's weights can be stored in; a model's folder with none of them is a partial
# download (the configs fetched, the weights not).
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")


def read_index(root: Path) -> dict[str, Any]:
    """The folder's ``model_index.json``, checked: JSON, an object, and every model it lists (a
    class that is a torch module: not a tokenizer or scheduler) present with weights. Raises
    AutoFitUsageError with one line that says what is wrong."""
    import importlib

    from autofit.errors import AutoFitUsageError

    index_path = root / "model_index.json"
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise AutoFitUsageError(f"{index_path}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)}{where}); "
                                "download the pipeline again or fix the file") from None
    except OSError as exc:
        raise AutoFitUsageError(f"{index_path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(index, dict):
        raise AutoFitUsageError(f"{index_path}: not a JSON object (it is a {type(index).__name__}); "
                                "download the pipeline again or fix the file")
    missing = []
    for name, spec in index.items():
        if (name.startswith("_") or not isinstance(spec, list) or len(spec) != 2
                or spec[0] not in ("diffusers", "transformers") or not isinstance(spec[1], str)):
            continue  # a class of another library (a community pipeline's) is not judged
        try:  # from the library the index names (diffusers' lazy search for a transformers name is slow)
            cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        except Exception:  # a broken install must not break `autofit plan`
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # a tokenizer, a scheduler, a processor: no weights
        folder = root / name
        if not folder.is_dir():
            missing.append(f"{name} (no {name}/ folder)")
        elif not any(any(folder.glob(p)) for p in _WEIGHT_FILES):
            missing.append(f"{name} ({name}/ has no weights)")
    if missing:
        raise AutoFitUsageError(f"{root}: model_index.json lists components the folder lacks: {', '.join(missing)}; "
                                "download the whole pipeline (a partial download?)")
    return index


def measure_folder(path: "str | Path", dtype: str | None = None) -> tuple[str, Footprint]:
    """(pipeline class name, footprint) of a diffusers model folder, from headers only."""
    root = Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{root} has no model_index.json; pass the folder of a diffusers pipeline "
            "(the one save_pretrained() wrote, or a snapshot from the hub cache)"
        )
    index = read_index(root)
    comps: dict[str, ComponentFootprint] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        files = sorted((root / name).glob("*.safetensors"))
        if files:
            header: dict = {}
            for f in files:
                header.update(read_safetensors_header(f))
            # Loaded from this folder, the components' own files are the undo copy of one-way
            # rungs (a prediction: the loaded pipeline checks its modules' keys against them, and
            # autofit compares the contents before releasing anything).
            comps[name] = footprint_from_header(name, header, spec[1], dtype, restorable=True)
            continue
        pickled = sorted((root / name).glob("*.bin"))
        if pickled:  # older checkpoints; autofit's undo reads only safetensors
            try:
                header = _pickled_header(pickled)
            except Exception as exc:  # not a plain state dict (weights_only refuses it), unreadable
                warnings.warn(f"autofit: {name} is left out of the footprint: its .bin checkpoint could not "
                              f"be read for shapes ({type(exc).__name__}: {str(exc)[:120]}); save the pipeline "
                              f"with save_pretrained(safe_serialization=True) to measure it", stacklevel=2)
                continue
            comps[name] = footprint_from_header(name, header, spec[1], dtype)
    return index.get("_class_name", "DiffusionPipeline"), Footprint(comps)
