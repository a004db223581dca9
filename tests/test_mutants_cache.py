"""Tests that kill the mutants mutmut found alive in cache.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix; ``ǁ`` separates a class from its method). They use real files in a
temporary folder and no pipeline: the file runs in about a second. The equivalent survivors are
listed with their reasons in docs/testing.md.
"""

import errno
import json
import os
import time

import pytest
import structlog
import torch
from safetensors.torch import save_file

from autofit.facts import cache as cache_module
from autofit.facts.cache import MAX_RECORD_BYTES, SCHEMA, PlanCache, key_fields, make_key, record_problem
from autofit.facts.footprint import measure_folder

PIB = 1 << 50  # "a measured peak above 1 PiB is not a measurement"


# ---- record_problem: what makes a record unusable, and the reason shown for it ----------------
GOOD = {"schema": SCHEMA, "plan": ["model_offload"], "activations": {"denoise": 1024},
        "broken": {"group_leaf": ["unet"]}, "running": ["model_offload"], "explained": True,
        "key": {"pipeline": "X"}, "updated": 1.7e9}


@pytest.mark.parametrize("field, bad", [
    ("plan", "model_offload"), ("plan", [1]),
    ("activations", []), ("activations", {"denoise": -1}), ("activations", {"denoise": True}),
    ("activations", {"denoise": float("nan")}), ("activations", {"denoise": PIB + 1}), ("activations", {1: 5}),
    ("broken", []), ("broken", {"group_leaf": "unet"}), ("broken", {"group_leaf": [1]}),
    ("running", "model_offload"), ("explained", 1), ("key", ["pipeline"]), ("updated", -1.0),
    ("updated", float("inf")),
])
def test_a_record_with_one_field_wrong_is_refused_with_a_reason_that_starts_with_that_field(field, bad):
    """``autofit cache list`` and the ``cache_record_ignored`` event show why a record is not
    used: the reason names the field at fault first. A record with every field right is usable.
    mutants: cache.x_record_problem__mutmut_* (each field's check and its reason),
    cache.x__is_count__mutmut_*, cache.x__str_list__mutmut_*"""
    assert record_problem(GOOD) is None
    reason = record_problem({**GOOD, field: bad})
    assert reason is not None and reason.split()[0] == field, reason


@pytest.mark.parametrize("record, head, found", [
    ([], "a record is an object, not", "list"), ("x", "a record is an object, not", "str"),
    ({**GOOD, "schema": 99}, "schema", "99"), ({"plan": []}, "schema", "None"),
])
def test_the_reason_for_a_wrong_record_or_schema_says_what_was_found(record, head, found):
    """The reason names what the file holds instead (its JSON type, the schema it declares), and
    for a schema, the one this autofit reads.
    mutants: cache.x_record_problem__mutmut_1..12 (the type and schema reasons)"""
    reason = record_problem(record)
    assert reason.startswith(head) and found in reason.replace(",", " ").split(), reason
    if head == "schema":
        assert reason.split(",")[0] == f"schema {found}" and reason.endswith(f"reads {SCHEMA}")


@pytest.mark.parametrize("value, ok", [(0, True), (PIB, True), (PIB + 1, False), (PIB * 1.0, True),
                                       (-1, False), (True, False), (float("nan"), False), ("5", False)])
def test_an_activation_is_a_count_of_bytes_up_to_1_pib(value, ok):
    """A measured peak is a finite, non-negative number of bytes, up to 1 PiB inclusive.
    mutants: cache.x__is_count__mutmut_8"""
    assert (record_problem({"schema": SCHEMA, "activations": {"denoise": value}}) is None) is ok


# ---- the key: what a plan depends on --------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A diffusers model folder on disk (model_index.json and safetensors headers), as
    ``autofit cache clear --model`` reads it."""
    root = tmp_path_factory.mktemp("model")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    for name in ("unet", "vae"):
        (root / name).mkdir()
        save_file({"w": torch.zeros(4, 4)}, str(root / name / "diffusion_pytorch_model.safetensors"))
    return root


def _fields(model_dir, **change):
    pipeline, footprint = measure_folder(model_dir)
    args = dict(pipeline=pipeline, footprint=footprint, height=1024, width=1024, frames=1, batch=1,
                device_name="cpu", budget_bytes=8 << 30, policy="balanced", cfg=True)
    args.update(change)
    return key_fields(**args)


def test_the_key_follows_every_field_a_plan_depends_on(model_dir):
    """Each input of the key gives another key; the resolution counts in 64K-pixel buckets and the
    budget in 512 MiB buckets (a grown budget gives a new key, the same budget the same key).
    mutants: cache.x_key_fields__mutmut_*, cache.x_make_key__mutmut_*"""
    base = make_key(_fields(model_dir))
    assert base == make_key(_fields(model_dir)) and PlanCache()._path(base)  # stable, a valid key
    same = [dict(width=1024 + 16), dict(height=1024 - 8), dict(budget_bytes=(8 << 30) + (511 << 20))]
    for change in same:
        assert make_key(_fields(model_dir, **change)) == base, change
    other = [dict(pipeline="FluxPipeline"), dict(width=1024 + 256), dict(height=512), dict(frames=2), dict(batch=2),
             dict(device_name="cuda:0"), dict(budget_bytes=(8 << 30) + (512 << 20)), dict(budget_bytes=7 << 30),
             dict(policy="speed"), dict(cfg=False)]
    keys = {make_key(_fields(model_dir, **change)) for change in other}
    assert base not in keys and len(keys) == len(other)
    fields = _fields(model_dir)
    assert fields["schema"] == SCHEMA and fields["versions"]["torch"] == torch.__version__
    assert make_key(dict(reversed(list(fields.items())))) == base  # the order fields come in is not the key


def test_guidance_is_assumed_unless_the_call_says_otherwise(model_dir):
    """``cfg`` defaults to True (guidance on, diffusers' default for the pipelines autofit runs).
    mutants: cache.x_key_fields__mutmut_1"""
    fields = _fields(model_dir)
    del fields["cfg"]
    pipeline, footprint = measure_folder(model_dir)
    default = key_fields(pipeline=pipeline, footprint=footprint, height=1024, width=1024, frames=1, batch=1,
                         device_name="cpu", budget_bytes=8 << 30, policy="balanced")
    assert make_key(default) == make_key(_fields(model_dir, cfg=True)) != make_key(_fields(model_dir, cfg=False))


def test_pixels_are_bucketed_by_rounding_to_the_nearest_64k(model_dir):
    """256x384 is 1.5 buckets of 65,536 pixels: Python's round() makes it bucket 2, the bucket of
    256x512, not that of 256x256.
    mutants: cache.x_key_fields__mutmut_19"""
    assert round(256 * 384 / 65536) == round(256 * 512 / 65536) != round(256 * 256 / 65536)
    key = make_key(_fields(model_dir, height=256, width=384))
    assert key == make_key(_fields(model_dir, height=256, width=512))
    assert key != make_key(_fields(model_dir, height=256, width=256))


def test_cache_list_shows_the_workload_a_stored_key_describes(model_dir, tmp_path, capsys):
    """``autofit cache list`` reads the workload back from the stored key: model, megapixels (the
    64K bucket), frames, batch, budget (the 512 MiB bucket's floor), policy and device; ``cache
    show`` shows whether guidance was on.
    mutants: cache.x_key_fields__mutmut_15..29 (the key's field names)"""
    from autofit.cli import main

    fields = _fields(model_dir, height=768, width=1024, frames=3, batch=2, device_name="cuda:1",
                     budget_bytes=(6 << 30) + (700 << 20), policy="speed", cfg=False)
    key = make_key(fields)
    PlanCache(tmp_path).put(key, {"plan": ["vae_tiling"], "key": fields})
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["records"]
    assert (row["key"], row["pipeline"], row["frames"], row["batch"], row["policy"], row["device"], row["plan"]) == (
        key, "StableDiffusionXLPipeline", 3, 2, "speed", "cuda:1", ["vae_tiling"])
    assert row["megapixels"] == round(round(768 * 1024 / 65536) * 65536 / 1e6, 2)
    assert row["budget_gib"] == 6.5  # 6 GiB + 700 MiB is in the bucket from 6.5 GiB
    assert main(["cache", "show", key, "--cache-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["key"]["cfg"] is False


def test_the_components_are_part_of_the_key(model_dir, tmp_path):
    """A pipeline with other components (here, a bigger denoiser) has another key."""
    import shutil

    bigger = tmp_path / "bigger"
    shutil.copytree(model_dir, bigger)
    save_file({"w": torch.zeros(8, 8)}, str(bigger / "unet" / "diffusion_pytorch_model.safetensors"))
    assert make_key(_fields(bigger)) != make_key(_fields(model_dir))


# ---- what `autofit cache` lists, shows and clears ---------------------------------------------
def _stored(cache, key, record):
    cache.put(key, record)
    return cache.get(key)


def test_the_list_holds_every_record_newest_first_with_what_get_reads(tmp_path):
    """``entries()``: one entry per record file, named by its key, at its path, with the record
    ``get`` reads (None and a reason for one it cannot use), newest first; keys with '-' and '_'
    are keys; a file whose name is no key is listed with the key check's own words.
    mutants: cache.xǁPlanCacheǁentries__mutmut_*"""
    cache = PlanCache(tmp_path)
    keys = ["k-0", "k_1", "k2", "k-3", "k_4", "k5"]
    for n, key in enumerate(keys):
        _stored(cache, key, {"plan": [], "n": n})
        time.sleep(0.002)  # distinct times: "updated" orders them
    (cache.plans / "junk.json").write_text("[1, 2]")
    (cache.plans / "my notes.json").write_text("{}")
    entries = cache.entries()
    by_key = {e.key: e for e in entries}
    assert sorted(by_key) == sorted([*keys, "junk", "my notes"])
    for e in entries:
        assert e.path == cache.plans / f"{e.key}.json"
    records = [e.record for e in entries if e.record is not None]
    assert [r["n"] for r in records] == [5, 4, 3, 2, 1, 0]  # newest first
    for key in keys:
        assert by_key[key].record == cache.get(key) and by_key[key].problem is None
    assert entries[-2:] in ([by_key["junk"], by_key["my notes"]], [by_key["my notes"], by_key["junk"]])
    assert by_key["junk"].problem == record_problem([1, 2])
    with pytest.raises(ValueError) as refused:
        cache._path("my notes")
    assert by_key["my notes"].record is None and by_key["my notes"].problem in str(refused.value)


def test_listing_a_cache_that_does_not_exist_creates_nothing(tmp_path):
    """Looking is not writing: no cache folder is made by ``entries``.
    mutants: cache.xǁPlanCacheǁentries__mutmut_3"""
    cache = PlanCache(tmp_path / "none")
    assert cache.entries() == []
    assert not (tmp_path / "none").exists()


def test_removing_a_record_forgets_it_and_its_lock(tmp_path):
    """``remove(key)`` deletes the record and its lock, and says whether there was a record.
    mutants: cache.xǁPlanCacheǁremove__mutmut_*"""
    cache = PlanCache(tmp_path)
    cache.update("a", lambda r: {"plan": []})  # makes a.json and a.lock
    cache.update("b", lambda r: {"plan": []})
    assert sorted(p.name for p in cache.plans.iterdir()) == ["a.json", "a.lock", "b.json", "b.lock"]
    assert cache.remove("a") is True
    assert sorted(p.name for p in cache.plans.iterdir()) == ["b.json", "b.lock"] and cache.get("a") is None
    assert cache.remove("a") is False
    (cache.plans / "b.json").unlink()
    assert cache.remove("b") is False and list(cache.plans.iterdir()) == []  # a lock alone: no record
    with pytest.raises(ValueError):
        cache.remove("../b")


def test_clear_forgets_every_record_or_those_of_one_model(tmp_path, model_dir):
    """``clear()`` removes every record; ``clear(model_dir=...)`` those whose key names that
    folder's pipeline class and component classes (keys as the runtime makes them, read back from
    JSON), and unreadable ones; records of other pipelines stay. What cannot be removed (a folder
    where a record should be) is reported, not raised.
    mutants: cache.xǁPlanCacheǁclear__mutmut_*"""
    cache = PlanCache(tmp_path)
    mine = _fields(model_dir)
    mine_other_size = _fields(model_dir, height=512, batch=2)
    other_pipeline = _fields(model_dir, pipeline="FluxPipeline")
    other_classes = {**mine, "components": [["unet", "FluxTransformer2DModel", 64, "float32"],
                                            ["vae", "AutoencoderKL", 64, "float32"]]}
    fewer = {**mine, "components": [["unet", "UNet2DConditionModel", 64, "float32"]]}
    odd = {**mine, "components": [["unet"], "vae", ["unet", "UNet2DConditionModel"], ["vae", "AutoencoderKL"]]}
    no_components = {**mine, "components": None}
    for fields in (mine, mine_other_size, other_pipeline, other_classes, fewer, odd, no_components):
        _stored(cache, make_key(fields), {"plan": [], "key": fields})
    _stored(cache, "nokey", {"plan": []})
    (cache.plans / "junk.json").write_text("not json")
    keep = {make_key(f) for f in (other_pipeline, other_classes, fewer, no_components)} | {"nokey"}
    with structlog.testing.capture_logs() as logs:
        removed = cache.clear(model_dir=model_dir)
    assert removed == 4  # mine, mine_other_size, odd (its well-formed pairs are the model's), junk
    assert {e.key for e in cache.entries()} == keep
    assert logs == []

    (cache.plans / "folder.json").mkdir()
    (cache.plans / "not a key.json").write_text("{}")
    with structlog.testing.capture_logs() as logs:
        assert cache.clear() == len(keep)
    failed = sorted(e["error"] for e in logs if e["event"] == "autofit.cache_write_failed")
    assert len(failed) == 2 and all(e["log_level"] == "warning" for e in logs)
    assert failed[0] == f"cannot remove {cache.plans / 'folder.json'}: {os.strerror(errno.EISDIR)}; remove it by hand"
    with pytest.raises(ValueError) as refused:
        cache._path("not a key")
    assert failed[1] == f"cannot remove {cache.plans / 'not a key.json'}: {refused.value}; remove it by hand"
    assert sorted(p.name for p in cache.plans.iterdir() if p.suffix == ".json") == ["folder.json", "not a key.json"]


# ---- reading: the reasons a stored file is not used ----------------------------------------
def test_a_record_too_large_or_not_json_is_ignored_with_its_reason(tmp_path):
    """``get`` ignores a file over ``MAX_RECORD_BYTES`` or not JSON, and its event says which.
    mutants: cache.xǁPlanCacheǁ_read__mutmut_*"""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    (cache.plans / "big.json").write_text(" " * MAX_RECORD_BYTES + json.dumps({"schema": SCHEMA}))
    (cache.plans / "edge.json").write_text(json.dumps({"schema": SCHEMA}).rjust(MAX_RECORD_BYTES))
    (cache.plans / "bad.json").write_text("{")
    (cache.plans / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with structlog.testing.capture_logs() as logs:
        assert cache.get("big") is None and cache.get("bad") is None and cache.get("deep") is None
        assert cache.get("edge") == {"schema": SCHEMA}  # exactly the limit is still read
    reasons = [e["reason"] for e in logs]
    assert [e["event"] for e in logs] == ["autofit.cache_record_ignored"] * 3
    assert [e["key"] for e in logs] == ["big", "bad", "deep"]
    assert reasons[0] == f"larger than {MAX_RECORD_BYTES} bytes"
    assert reasons[1] == f"not readable JSON ({type(_json_error('{')).__name__})"
    assert reasons[2] == f"not readable JSON ({type(_json_error('[' * 100_000 + ']' * 100_000)).__name__})"


def _json_error(text):
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        return exc
    raise AssertionError("valid JSON")


def test_a_record_that_is_not_a_regular_file_is_ignored_with_the_systems_words(tmp_path):
    """A folder planted where a record goes is not read; the reason quotes the system's error.
    mutants: cache.xǁPlanCacheǁ_read__mutmut_*, cache.x__open_regular__mutmut_*"""
    cache = PlanCache(tmp_path)
    (cache.plans / "d.json").mkdir(parents=True)
    with structlog.testing.capture_logs() as logs:
        assert cache.get("d") is None
    with pytest.raises(OSError) as refused:  # the check itself, called directly
        cache_module._open_regular(cache.plans / "d.json", os.O_RDONLY)
    assert logs[0]["reason"] == f"cannot be opened as a regular file ({refused.value.strerror})"
    assert cache_module.PlanCache(tmp_path / "nothing").get("k") is None  # no folder: no record, no event


def test_any_value_in_the_fields_is_keyed_by_its_text_and_keys_are_32_characters():
    """``make_key`` keys values JSON cannot write by their text (a dtype, a path), and its keys
    are 32 hex digits: the file names the records of earlier runs are stored under.
    mutants: cache.x_make_key__mutmut_4, cache.x_make_key__mutmut_7, cache.x_make_key__mutmut_9"""
    from pathlib import Path

    fp16, bf16 = make_key({"dtype": torch.float16}), make_key({"dtype": torch.bfloat16})
    assert fp16 != bf16 and fp16 == make_key({"dtype": "torch.float16"})
    assert make_key({"dir": Path("/a")}) == make_key({"dir": "/a"})
    assert all(len(k) == 32 and set(k) <= set("0123456789abcdef") for k in (fp16, bf16))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to plant another user's lock")
def test_a_lock_another_user_owns_keeps_its_mode(tmp_path):
    """Processes of several users share a lock file; only its owner sets its mode (root could
    change anyone's).
    mutants: cache.xǁPlanCacheǁupdate__mutmut_19"""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    os.chmod(cache.plans, 0o700)
    lock = cache.plans / "k.lock"
    lock.write_text("")
    os.chown(lock, 12345, 12345)
    os.chmod(lock, 0o644)
    cache.update("k", lambda r: {"plan": []})
    assert lock.stat().st_mode & 0o777 == 0o644 and cache.get("k")["plan"] == []


def test_only_temporaries_older_than_ten_minutes_and_never_a_symlink_are_removed(tmp_path, monkeypatch):
    """The next write removes a temporary file of ``put``'s naming *older than*
    ``STALE_TEMPORARY_SECONDS`` (docs/logging.md: "older than 10 minutes"), a regular file only:
    a symlink of that name stays, whatever it points to. Each removal is an INFO event naming the
    file, at the cache's load stage like its other events.
    mutants: cache.x__remove_stale_temporaries__mutmut_12, _13, _17, _22, _23, _25, _27, _29..34"""
    cache = PlanCache(tmp_path)
    cache.put("k", {"plan": []})
    now = 2_000_000_000  # whole seconds: the file times below are exact
    stale = cache_module.STALE_TEMPORARY_SECONDS
    names = {"edge": ".k.101.0a0b0c0d.tmp", "old": ".k.102.0a0b0c0e.tmp", "link": ".k.103.0a0b0c0f.tmp"}
    for what in ("edge", "old"):
        (cache.plans / names[what]).write_text("{")
    target = tmp_path / "users_old_file"
    target.write_text("mine")
    (cache.plans / names["link"]).symlink_to(target)
    os.utime(cache.plans / names["edge"], (now - stale, now - stale))
    os.utime(cache.plans / names["old"], (now - stale - 1, now - stale - 1))
    os.utime(target, (now - 10 * stale, now - 10 * stale))
    monkeypatch.setattr(cache_module.time, "time", lambda: float(now))
    (cache.plans / "bad.json").write_text("[]")
    with structlog.testing.capture_logs() as logs:
        cache.put("k", {"plan": []})
        cache.get("bad")
    left = sorted(p.name for p in cache.plans.iterdir())
    assert names["edge"] in left and names["link"] in left and names["old"] not in left
    assert target.read_text() == "mine"
    removed, ignored = logs
    assert removed["event"] == "autofit.cache_temporary_removed" and removed["log_level"] == "info"
    assert removed["file"] == names["old"] and removed["stage"] == ignored["stage"] == "load"
    assert "action" not in removed  # nothing was decided: docs/logging.md leaves action="none" out


def test_puts_temporary_file_is_one_the_next_writer_would_clean_up(tmp_path):
    """While ``put`` writes, its temporary file is in the folder under a name of the pattern the
    stale-file cleanup removes (so a writer killed at that moment leaves nothing forever).
    mutants: cache.xǁPlanCacheǁput__mutmut_14, _15"""
    cache = PlanCache(tmp_path)
    seen = []

    class Peek:  # written by json's default=str while the temporary file is open
        def __str__(self):
            seen.extend(n for n in os.listdir(cache.plans) if n.endswith(".tmp"))
            return "peeked"

    cache.put("k", {"plan": [], "note": Peek()})
    assert len(seen) == 1 and cache_module._TEMPORARY.fullmatch(seen[0]) and seen[0].startswith(".k.")
    assert cache.get("k")["note"] == "peeked" and not any(n.endswith(".tmp") for n in os.listdir(cache.plans))


def test_put_never_writes_through_a_symlink_planted_at_its_temporary_name(tmp_path, monkeypatch):
    """"never followed through a symlink": a symlink planted where the temporary file goes (its
    name made predictable here) makes the write fail; the file it points to is untouched.
    mutants: cache.xǁPlanCacheǁput__mutmut_26"""
    cache = PlanCache(tmp_path)
    cache.put("k", {"plan": ["before"]})
    monkeypatch.setattr(cache_module.secrets, "token_hex", lambda n: "0a0b0c0d")
    victim = tmp_path / "users_file"
    victim.write_text("mine")
    (cache.plans / f".k.{os.getpid()}.0a0b0c0d.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        cache.put("k", {"plan": ["after"]})
    assert victim.read_text() == "mine" and cache.get("k")["plan"] == ["before"]


def test_a_write_that_fails_leaves_no_temporary_and_raises_its_own_error(tmp_path):
    """A record that cannot be written (here a value whose text raises) leaves the old record and
    no temporary file, and the caller sees the error that stopped the write.
    mutants: cache.xǁPlanCacheǁput__mutmut_64"""
    cache = PlanCache(tmp_path)
    cache.put("k", {"plan": ["before"]})

    class Unwritable:
        def __str__(self):
            raise ValueError("cannot be written")

    with pytest.raises(ValueError, match="cannot be written"):
        cache.put("k", {"plan": ["after"], "note": Unwritable()})
    assert sorted(os.listdir(cache.plans)) == ["k.json"] and cache.get("k")["plan"] == ["before"]


def test_a_lock_that_is_not_a_regular_file_stops_the_update_with_an_einval_naming_it(tmp_path):
    """Locks are "nor opened when they are not regular files": ``update`` raises the OSError of
    an invalid argument (EINVAL), which names the lock file, and writes nothing.
    mutants: cache.x__open_regular__mutmut_17, _19, _22, _23"""
    cache = PlanCache(tmp_path)
    cache.plans.mkdir(parents=True)
    os.mkfifo(cache.plans / "k.lock")
    with pytest.raises(OSError) as info:
        cache.update("k", lambda r: {"plan": []})
    assert (info.value.errno, info.value.strerror, info.value.filename) == (errno.EINVAL, "not a regular file", "k.lock")
    assert cache.get("k") is None


def test_an_ignored_record_is_a_warning_at_load_and_looking_creates_nothing(tmp_path):
    """docs/logging.md: ``cache_record_ignored`` is a WARNING, with no placeholder ``action``;
    like the cache's other events it is at the load stage. A cache whose plans folder is not a
    folder of its own (a symlink) is ignored with the folder check's own words. Reading a cache
    that does not exist creates nothing.
    mutants: cache.xǁPlanCacheǁget__mutmut_5, _6, _11, _12, _20..23, cache.xǁPlanCacheǁ_read__mutmut_5, _6"""
    cache = PlanCache(tmp_path / "c")
    assert cache.get("k") is None and not (tmp_path / "c").exists()
    cache.plans.parent.mkdir()
    (tmp_path / "elsewhere").mkdir()
    cache.plans.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as refused:
        cache._plans_fd(create=False)
    with structlog.testing.capture_logs() as logs:
        assert cache.get("k") is None
    (event,) = logs
    assert event["event"] == "autofit.cache_record_ignored" and event["log_level"] == "warning"
    assert event["stage"] == "load" and "action" not in event and event["key"] == "k"
    assert event["reason"] == str(refused.value) and "not a folder of its own" in event["reason"]


@pytest.mark.parametrize("plant, codes", [("file", {errno.ENOTDIR}), ("symlink", {errno.ELOOP, errno.ENOTDIR})])
def test_a_plans_folder_that_is_not_a_folder_of_its_own_is_refused_naming_it(tmp_path, plant, codes):
    """A file or a symlink standing where the plans folder goes: a write fails with the system's
    error code and the folder's path, and a message saying what to do; a read ignores the record.
    mutants: cache.xǁPlanCacheǁ_plans_fd__mutmut_15, _16, _18, _19, _21, _22"""
    cache = PlanCache(tmp_path / "c")
    cache.directory.mkdir()
    if plant == "file":
        cache.plans.write_text("")
    else:
        (tmp_path / "elsewhere").mkdir()
        cache.plans.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError) as info:
        cache.put("k", {"plan": []})
    code = info.value.errno  # Linux says ENOTDIR for a symlink opened with O_DIRECTORY | O_NOFOLLOW
    assert code in codes and info.value.filename == str(cache.plans)
    assert info.value.strerror == f"the plan cache's plans folder is not a folder of its own ({os.strerror(code)}); remove it"
    assert cache.get("k") is None and list((tmp_path / "elsewhere").iterdir() if plant == "symlink" else []) == []


def test_a_cache_folder_is_made_with_its_parents(tmp_path):
    """mutants: cache.xǁPlanCacheǁ_plans_fd__mutmut_1, _3, _5"""
    cache = PlanCache(tmp_path / "a" / "b" / "c")
    cache.put("k", {"plan": ["x"]})
    assert cache.get("k")["plan"] == ["x"]


@pytest.mark.parametrize("name", ["-", "_", "--", "a-b_c", "ключ", "x y", "a.b"])
def test_the_list_calls_a_key_what_put_accepts_as_one(tmp_path, name):
    """A record ``put`` writes is listed as a record (and one ``put`` refuses to write is listed
    as no key): the list and the writer judge a file name the same way (they once disagreed on
    names made only of '-' and '_')."""
    cache = PlanCache(tmp_path)
    try:
        cache.put(name, {"plan": []})
    except ValueError:
        accepted = False
        cache.plans.mkdir(parents=True, exist_ok=True)
        (cache.plans / f"{name}.json").write_text("{}")
    else:
        accepted = True
    (entry,) = cache.entries()
    assert entry.key == name
    assert (entry.problem != "not a plan-cache key") == accepted
    if accepted:
        assert entry.record == cache.get(name)
