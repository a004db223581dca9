"""Host RAM under cgroup limits: the process's own (nested) cgroup, its parents, page cache, and
what `autofit doctor` reports. Fake /sys/fs/cgroup trees are built in tmp_path."""

import json

import psutil
import pytest

from autofit.facts import memory
from autofit.cli import main
from autofit.facts.memory import cgroup_memory, host_available_bytes

GIB = 2**30
V1_NO_LIMIT = 9223372036854771712  # what v1 shows for "no limit" (2**63 rounded down to a page)
V1_PROC = "5:pids:/\n4:memory:/slurm/job1/step0\n1:cpu,cpuacct:/slurm\n0::/\n"
V2_PROC = "0::/system.slice/job.scope\n"


@pytest.fixture(autouse=True)
def plenty_of_ram(monkeypatch):
    """psutil reports 1000 GiB available, so the cgroup figures are the binding ones."""
    real = psutil.virtual_memory()
    fake = real._replace(available=1000 * GIB)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: fake)


def v1_dir(root, rel, limit, usage, inactive=0, local_inactive=None):
    d = root / "memory" / rel.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    local = inactive if local_inactive is None else local_inactive
    (d / "memory.stat").write_text(f"cache 1\ninactive_file {local}\nactive_file 5\ntotal_inactive_file {inactive}\n")


def v2_dir(root, rel, limit, usage, inactive=0):
    d = root / rel.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{usage}\n")
    (d / "memory.stat").write_text(f"anon 7\nactive_file 3\ninactive_file {inactive}\nfile_mapped 2\n")


def test_v1_nested_limit_smaller_than_root_is_used(tmp_path):
    v1_dir(tmp_path, "/", V1_NO_LIMIT, 50 * GIB)
    v1_dir(tmp_path, "/slurm", V1_NO_LIMIT, 12 * GIB)
    v1_dir(tmp_path, "/slurm/job1", V1_NO_LIMIT, 12 * GIB)
    v1_dir(tmp_path, "/slurm/job1/step0", 16 * GIB, 10 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V1_PROC) == 6 * GIB
    cg = cgroup_memory(_root=tmp_path, _proc_cgroup=V1_PROC)
    assert cg == dict(limit=16 * GIB, usage=10 * GIB, inactive_file=0, available=6 * GIB,
                      path="/slurm/job1/step0", version=1)


def test_v1_parent_limit_smaller_than_child_is_used(tmp_path):
    v1_dir(tmp_path, "/", V1_NO_LIMIT, 50 * GIB)
    v1_dir(tmp_path, "/slurm", V1_NO_LIMIT, 30 * GIB)
    v1_dir(tmp_path, "/slurm/job1", 8 * GIB, 3 * GIB)
    v1_dir(tmp_path, "/slurm/job1/step0", 64 * GIB, 2 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V1_PROC) == 5 * GIB
    assert cgroup_memory(_root=tmp_path, _proc_cgroup=V1_PROC)["path"] == "/slurm/job1"


def test_v2_parent_limit_smaller_than_child_is_used(tmp_path):
    v2_dir(tmp_path, "/system.slice", 4 * GIB, 1 * GIB)
    v2_dir(tmp_path, "/system.slice/job.scope", 32 * GIB, 1 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V2_PROC) == 3 * GIB
    cg = cgroup_memory(_root=tmp_path, _proc_cgroup=V2_PROC)
    assert (cg["path"], cg["version"], cg["limit"]) == ("/system.slice", 2, 4 * GIB)


def test_v2_nested_limit_and_inactive_file_subtracted(tmp_path):
    """memory.current counts page cache; its inactive part is reclaimed before an OOM kill."""
    v2_dir(tmp_path, "/system.slice", "max", 9 * GIB)
    v2_dir(tmp_path, "/system.slice/job.scope", 10 * GIB, 9 * GIB, inactive=4 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V2_PROC) == 5 * GIB  # not 1 GiB
    cg = cgroup_memory(_root=tmp_path, _proc_cgroup=V2_PROC)
    assert (cg["inactive_file"], cg["usage"], cg["path"]) == (4 * GIB, 9 * GIB, "/system.slice/job.scope")


def test_v1_total_inactive_file_preferred_over_local(tmp_path):
    """v1's hierarchical total_inactive_file counts the children's cache; inactive_file alone is
    used when the total is absent."""
    v1_dir(tmp_path, "/", 10 * GIB, 9 * GIB, inactive=3 * GIB, local_inactive=1 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup="4:memory:/\n") == 4 * GIB
    (tmp_path / "memory" / "memory.stat").write_text(f"inactive_file {2 * GIB}\n")
    assert host_available_bytes(_root=tmp_path, _proc_cgroup="4:memory:/\n") == 3 * GIB


def test_max_and_huge_limits_are_ignored(tmp_path):
    v2_dir(tmp_path, "/", "max", 500 * GIB)
    v2_dir(tmp_path, "/system.slice", "max", 600 * GIB)
    v2_dir(tmp_path, "/system.slice/job.scope", 2**62, 900 * GIB)
    assert cgroup_memory(_root=tmp_path, _proc_cgroup=V2_PROC) is None
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V2_PROC) == 1000 * GIB


def test_missing_nested_path_falls_back_to_root(tmp_path):
    """In a cgroup namespace (or a bind-mounted subtree) the path in /proc/self/cgroup is not in
    the mounted tree: the root files are the container's own."""
    v1_dir(tmp_path, "/", 20 * GIB, 12 * GIB, inactive=2 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V1_PROC) == 10 * GIB
    assert cgroup_memory(_root=tmp_path, _proc_cgroup=V1_PROC)["path"] == "/"
    v2 = tmp_path / "v2"
    v2_dir(v2, "/", 6 * GIB, 1 * GIB)
    assert host_available_bytes(_root=v2, _proc_cgroup=V2_PROC) == 5 * GIB
    # /proc/self/cgroup unreadable or empty (not Linux, a sandbox): the root files as well
    assert host_available_bytes(_root=v2, _proc_cgroup="") == 5 * GIB


def test_usage_above_limit_clamps_at_zero(tmp_path):
    v2_dir(tmp_path, "/", 2 * GIB, 3 * GIB)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup="0::/\n") == 0


def test_no_cgroup_files_gives_psutil(tmp_path):
    assert cgroup_memory(_root=tmp_path, _proc_cgroup=V1_PROC + V2_PROC) is None
    assert host_available_bytes(_root=tmp_path, _proc_cgroup=V1_PROC + V2_PROC) == 1000 * GIB
    assert host_available_bytes(_root=tmp_path / "absent", _proc_cgroup=None) == 1000 * GIB


def test_psutil_lower_than_cgroup_wins(tmp_path, monkeypatch):
    v2_dir(tmp_path, "/", 64 * GIB, 1 * GIB)
    low = psutil.virtual_memory()._replace(available=7 * GIB)
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: low)
    assert host_available_bytes(_root=tmp_path, _proc_cgroup="0::/\n") == 7 * GIB


def test_this_machine_agrees_with_psutil_or_cgroup():
    """On the real /sys/fs/cgroup: the result is psutil's figure, or the cgroup's when lower."""
    cg = cgroup_memory()
    expected = 1000 * GIB if cg is None else min(1000 * GIB, cg["available"])
    assert host_available_bytes() == expected
    if cg is not None:
        assert cg["version"] in (1, 2) and 0 < cg["limit"] < 2**60 and cg["path"].startswith("/")


def test_doctor_json_reports_cgroup_and_quantization_reason(capsys, monkeypatch):
    from autofit.strategies import quantize

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cgroup" in report and report["cgroup"] == cgroup_memory()
    device_type = report["device"]["device_type"]
    assert report["missing"].get("quantization (nf4/int8)") == quantize.missing(device_type)

    # A broken or too old bitsandbytes (installed, so find_spec would have passed) is reported
    # with quantize.missing's reason, for the probed device type.
    seen = []

    def broken(dt):
        seen.append(dt)
        return "bitsandbytes 0.40.0 is too old; need >= 0.48"

    monkeypatch.setattr(quantize, "missing", broken)
    fake = dict(limit=8 * GIB, usage=3 * GIB, inactive_file=1 * GIB, available=6 * GIB, path="/job/7", version=1)
    monkeypatch.setattr(memory, "cgroup_memory", lambda **_: fake)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing"]["quantization (nf4/int8)"] == "bitsandbytes 0.40.0 is too old; need >= 0.48"
    assert seen == [device_type]
    assert report["cgroup"] == fake
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "cgroup v1 memory limit: 8.00 GiB at /job/7" in text and "6.00 GiB available" in text
    assert "unavailable: quantization (nf4/int8): bitsandbytes 0.40.0 is too old" in text
