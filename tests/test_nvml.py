"""hardware._nvml finds torch's device in NVML by UUID (or PCI bus id), never by index: NVML ignores
CUDA_VISIBLE_DEVICES, so with CUDA_VISIBLE_DEVICES=1 torch's cuda:0 is NVML's GPU 1, not its GPU 0.

NVML is a C driver library we cannot have without a GPU, so these tests use a small fake of the few
pynvml functions autofit calls, with two GPUs."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from autofit.facts import hardware

GiB = 1 << 30
HEX0 = "aaaaaaaa-0000-1111-2222-333333333333"
HEX1 = "bbbbbbbb-4444-5555-6666-777777777777"
HEX_MIG = "cccccccc-8888-9999-aaaa-bbbbbbbbbbbb"
BUS0 = "00000000:1a:00.0"
BUS1 = "00000000:3b:00.0"


class NVMLError(Exception):
    pass


def fake_pynvml(*, bytes_only: bool = False, mig_mode_on: tuple[int, ...] = (), mig_slices: tuple[str, ...] = ()):
    """A pynvml stand-in with two GPUs. ``bytes_only``: lookups take and names come back as bytes, as in
    older pynvml. ``mig_mode_on``: indices of GPUs in MIG mode. ``mig_slices``: MIG UUIDs it knows (on GPU 1)."""
    gpus = [
        dict(uuid="GPU-" + HEX0, bus=BUS0, name="Fake GPU zero", total=80 * GiB, free=10 * GiB,
             procs=[(1111, 70 * GiB)]),
        dict(uuid="GPU-" + HEX1, bus=BUS1, name="Fake GPU one", total=40 * GiB, free=30 * GiB,
             procs=[(os.getpid(), 5 * GiB), (2222, 3 * GiB), (3333, None)]),
    ]
    m = types.ModuleType("pynvml")
    m.calls = []
    m.NVMLError = NVMLError
    m.NVML_DEVICE_MIG_ENABLE = 1

    def key_text(key):
        if bytes_only and isinstance(key, str):
            raise TypeError("bytes or integer address expected instead of str instance")
        return key.decode() if isinstance(key, bytes) else key

    def find(field, key):
        for i, gpu in enumerate(gpus):
            if gpu[field] == key:
                return ("gpu", i)
        raise NVMLError("Not Found")

    def nvmlInit():
        m.calls.append("init")

    def nvmlShutdown():
        m.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(index):
        m.calls.append(("index", index))
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(uuid):
        uuid = key_text(uuid)
        m.calls.append(("uuid", uuid))
        if uuid in mig_slices:
            return ("mig", uuid)
        return find("uuid", uuid)

    def nvmlDeviceGetHandleByPciBusId(bus):
        bus = key_text(bus)
        m.calls.append(("pci", bus))
        return find("bus", bus)

    def gpu(handle):
        if handle[0] != "gpu":
            raise NVMLError("Not Supported")  # a MIG handle: autofit should never get this far
        return gpus[handle[1]]

    def nvmlDeviceGetMemoryInfo(handle):
        g = gpu(handle)
        return types.SimpleNamespace(total=g["total"], free=g["free"], used=g["total"] - g["free"])

    def nvmlDeviceGetName(handle):
        name = gpu(handle)["name"]
        return name.encode() if bytes_only else name

    def nvmlDeviceGetComputeRunningProcesses(handle):
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu(handle)["procs"]]

    def nvmlDeviceGetMigMode(handle):
        if handle[1] in mig_mode_on:
            return [1, 1]
        raise NVMLError("Not Supported")

    for fn in (nvmlInit, nvmlShutdown, nvmlDeviceGetHandleByIndex, nvmlDeviceGetHandleByUUID,
               nvmlDeviceGetHandleByPciBusId, nvmlDeviceGetMemoryInfo, nvmlDeviceGetName,
               nvmlDeviceGetComputeRunningProcesses, nvmlDeviceGetMigMode):
        setattr(m, fn.__name__, fn)
    return m


GPU1 = (40 * GiB, 30 * GiB, 3 * GiB, "Fake GPU one")


def index_calls(nvml):
    return [c for c in nvml.calls if isinstance(c, tuple) and c[0] == "index"]


@pytest.fixture(autouse=True)
def _cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")


def test_looks_up_by_uuid_not_index():
    nvml = fake_pynvml()
    # torch's cuda:0 is NVML's GPU 1 here; an index lookup would report GPU 0 (80 GiB, 10 GiB free).
    assert hardware._nvml_read(nvml, HEX1, None) == GPU1
    assert ("uuid", "GPU-" + HEX1) in nvml.calls
    assert index_calls(nvml) == []
    assert nvml.calls[0] == "init" and nvml.calls[-1] == "shutdown"


def test_other_processes_exclude_this_process():
    total, free, others, name = hardware._nvml_read(fake_pynvml(), HEX1, None)
    assert others == 3 * GiB  # 2222's 3 GiB; our own 5 GiB and a process with no figure left out
    total0, free0, others0, _ = hardware._nvml_read(fake_pynvml(), HEX0, None)
    assert (total0, free0, others0) == (80 * GiB, 10 * GiB, 70 * GiB)


@pytest.mark.parametrize("raw", [HEX1, HEX1.encode(), "GPU-" + HEX1, ("GPU-" + HEX1).encode(), HEX1 + "\0"])
@pytest.mark.parametrize("bytes_only", [False, True])
def test_str_and_bytes_uuids(raw, bytes_only):
    nvml = fake_pynvml(bytes_only=bytes_only)
    assert hardware._nvml_read(nvml, hardware._uuid_text(raw), None) == GPU1
    assert index_calls(nvml) == []


@pytest.mark.parametrize("raw", [None, "", b"", "00000000-0000-0000-0000-000000000000", bytes(16)])
def test_unknown_uuid_text(raw):
    assert hardware._uuid_text(raw) is None


def test_lookup_failure_gives_none_not_index():
    nvml = fake_pynvml()
    assert hardware._nvml_read(nvml, "dddddddd-0000-0000-0000-000000000000", None) is None
    assert hardware._nvml_read(nvml, None, None) is None
    assert hardware._nvml_read(nvml, None, "00000000:99:00.0") is None
    assert index_calls(nvml) == []
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 3


def test_nvml_init_failure_gives_none():
    nvml = fake_pynvml()

    def broken():
        raise NVMLError("Driver Not Loaded")

    nvml.nvmlInit = broken
    assert hardware._nvml_read(nvml, HEX1, BUS1) is None


def test_pci_bus_id_fallback():
    nvml = fake_pynvml()
    assert hardware._nvml_read(nvml, None, BUS1) == GPU1
    nvml = fake_pynvml(bytes_only=True)
    assert hardware._nvml_read(nvml, "eeeeeeee-0000-0000-0000-000000000000", BUS1) == GPU1
    assert ("pci", BUS1) in nvml.calls and index_calls(nvml) == []


def test_pci_bus_id_from_torch_props():
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    assert hardware._pci_bus_id(props) == BUS1
    assert hardware._pci_bus_id(types.SimpleNamespace()) is None
    assert hardware._pci_bus_id(types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0, pci_device_id=0)) is None


def test_mig_gives_none(monkeypatch):
    nvml = fake_pynvml(mig_slices=("MIG-" + HEX_MIG,), mig_mode_on=(1,))
    assert hardware._nvml_read(nvml, "MIG-" + HEX_MIG, BUS1) is None  # a prefixed MIG UUID
    assert hardware._nvml_read(nvml, HEX_MIG, BUS1) is None  # torch's bare hex, which NVML knows as MIG-
    # UUID unknown: the PCI bus id finds the parent GPU, whose memory figures are not the slice's.
    assert hardware._nvml_read(nvml, None, BUS1) is None
    assert hardware._nvml_read(fake_pynvml(), None, BUS1) == GPU1  # the same GPU without MIG mode
    old = fake_pynvml(mig_slices=("MIG-" + HEX_MIG,))
    del old.nvmlDeviceGetMigMode  # an older pynvml: the parent's MIG mode cannot be read
    assert hardware._nvml_read(old, HEX_MIG, BUS1) is None  # yet NVML knows torch's UUID as a MIG slice
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-" + HEX_MIG)
    assert hardware._nvml_read(fake_pynvml(), HEX1, BUS1) is None


class TorchUUID:
    """Like torch's _CUuuid: str() gives the bare hex, without NVML's GPU- prefix."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def fake_props(uuid_hex, bus):
    return types.SimpleNamespace(uuid=TorchUUID(uuid_hex), pci_domain_id=0, pci_bus_id=bus, pci_device_id=0,
                                 total_memory=40 * GiB)


def test_nvml_reads_torch_device_ids(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: fake_props(HEX1, 0x3B))
    assert hardware._nvml(0) == GPU1
    assert index_calls(nvml) == []


def test_probe_plans_against_torch_device(monkeypatch):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: fake_props(HEX1, 0x3B))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=None: (30 * GiB, 40 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "torch name")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    hw = hardware.read_machine("cuda:0")
    assert (hw.source, hw.device_name, hw.total_bytes, hw.free_bytes) == ("nvml", "Fake GPU one", 40 * GiB, 30 * GiB)
    assert hw.other_processes_bytes == 3 * GiB
    assert hw.budget_bytes == 30 * GiB  # GPU 0 (index lookup) would have given 10 GiB
    assert index_calls(nvml) == []
