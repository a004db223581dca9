"""Tests that kill the mutants mutmut found alive in batch_items.py (issue 26, docs/testing.md).

Each test names the mutants it kills (``mutants:``, as ``mutmut results`` lists them, without the
``autofit.`` prefix). Real prompts files in a temporary folder, no pipeline: the file runs in about
a second. The references are the module's own table of ranges (``_INT_RANGES``), its documented
rules, and Python's readers of the same file (json, csv). Equivalent survivors are listed with their
reasons in docs/testing.md.
"""

import csv
import io
import json

import pytest

from autofit.batch.items import (_INT_RANGES, CALL_KEYS, KNOWN_KEYS, MAX_ID_LENGTH, MAX_SEED, BatchItem, aside_id,
                                 id_problem, load_items, read_items, shown_id)
from autofit.errors import AutoFitUsageError


def _jsonl(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _one(tmp_path, row, **kw):
    """(the item, None) or (None, the error) of a one-line prompts file."""
    good, rejected = read_items(_jsonl(tmp_path, [row]), **kw)
    assert len(good) + len(rejected) == 1
    return (good[0], None) if good else (None, rejected[0].error)


def _setting(item, key):
    return item.seed if key == "seed" else item.settings[key]


# ---- whole numbers: the table's ranges and steps -------------------------------------------
@pytest.mark.parametrize("key", sorted(_INT_RANGES))
def test_whole_number_settings_accept_their_range_and_refuse_past_it(tmp_path, key):
    """Each whole-number key takes ``low..high`` in steps of ``step`` (``_INT_RANGES``), as int,
    from a number, an integral float or a text with spaces; past either end, or off the step, the
    item is refused with the key, the value and the range or the step.
    mutants: batch_items.x__int__mutmut_*, batch_items.x__value__mutmut_*, batch_items.x__check__mutmut_*"""
    low, high, step = _INT_RANGES[key]
    for value, expected in [(low, low), (high, high), (float(low), low), (f" {low + step} ", low + step)]:
        item, error = _one(tmp_path, {"prompt": "a", key: value})
        assert error is None, error
        got = _setting(item, key)
        assert got == expected and type(got) is int
    for value in (low - 1, high + 1):
        item, error = _one(tmp_path, {"prompt": "a", key: value})
        assert error.endswith(f"{key}={value} is out of range; use {low}..{high}"), error
    if step > 1:
        item, error = _one(tmp_path, {"prompt": "a", key: low + 1})
        assert error.endswith(f"{key}={low + 1} must be a multiple of {step}"), error


@pytest.mark.parametrize("value, why", [(True, "is a boolean, not a whole number"), (2.5, "is not a whole number"),
                                        ("2.5", "is not a whole number"), ("abc", "is not a whole number"),
                                        ([4], "is not a whole number"), ({"n": 4}, "is not a whole number")])
def test_a_whole_number_setting_of_another_kind_is_refused_naming_it(tmp_path, value, why):
    """mutants: batch_items.x__int__mutmut_*"""
    item, error = _one(tmp_path, {"prompt": "a", "num_inference_steps": value})
    assert error.endswith(f"num_inference_steps={value!r} {why}"), error


def test_non_finite_numbers_are_refused(tmp_path):
    """NaN and infinity (Python's json reads them) are no whole number and no guidance scale.
    mutants: batch_items.x__int__mutmut_*, batch_items.x__value__mutmut_*"""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "seed": NaN}\n{"prompt": "a", "seed": Infinity}\n'
                    '{"prompt": "a", "guidance_scale": NaN}\n{"prompt": "a", "guidance_scale": -Infinity}\n')
    good, rejected = read_items(path)
    assert good == [] and [r.line for r in rejected] == [1, 2, 3, 4]
    assert rejected[0].error.endswith("seed=nan is not a whole number")
    assert rejected[1].error.endswith("seed=inf is not a whole number")
    assert rejected[2].error.endswith("guidance_scale=nan is out of range; use 0..100")


@pytest.mark.parametrize("value, expected", [(0, 0.0), (100, 100.0), ("7.5", 7.5), (" 3 ", 3.0), (5, 5.0)])
def test_guidance_scale_is_a_number_from_0_to_100(tmp_path, value, expected):
    """mutants: batch_items.x__value__mutmut_*"""
    item, error = _one(tmp_path, {"prompt": "a", "guidance_scale": value})
    assert error is None and item.settings["guidance_scale"] == expected
    assert type(item.settings["guidance_scale"]) is float


@pytest.mark.parametrize("value, why", [(True, "is not a number"), ([1], "is not a number"), (None, None),
                                        ("x", "is not a number"), (-0.5, "is out of range; use 0..100"),
                                        (100.5, "is out of range; use 0..100")])
def test_guidance_scale_of_another_kind_or_out_of_range_is_refused(tmp_path, value, why):
    """None (and "") means "not given": the pipeline's default.
    mutants: batch_items.x__value__mutmut_*"""
    item, error = _one(tmp_path, {"prompt": "a", "guidance_scale": value})
    if why is None:
        assert error is None and "guidance_scale" not in item.settings
    else:
        assert error.endswith(f"guidance_scale={value!r} {why}"), error


@pytest.mark.parametrize("key", ["prompt", "negative_prompt"])
def test_texts_must_be_text(tmp_path, key):
    """mutants: batch_items.x__value__mutmut_*"""
    item, error = _one(tmp_path, {"prompt": "a", key: 5})
    assert error.endswith(f"{key}=5 must be text"), error
    item, error = _one(tmp_path, {"prompt": "a", key: " b "})
    assert error is None and (item.prompt if key == "prompt" else item.settings[key]) == " b "


# ---- ids --------------------------------------------------------------------------------------
def test_an_id_names_files_so_it_is_limited_in_bytes_and_characters():
    """An id is at most ``MAX_ID_LENGTH`` bytes of UTF-8, of letters, digits, '-', '_', '.' (not
    first); the message gives the length in characters, and in bytes when they differ.
    mutants: batch_items.x_id_problem__mutmut_*"""
    assert id_problem("a" * MAX_ID_LENGTH) is None
    assert id_problem("é" * (MAX_ID_LENGTH // 2)) is None
    assert id_problem("") == "has an empty id" and id_problem(None) == "has an empty id"
    too_long = id_problem("a" * (MAX_ID_LENGTH + 1))
    assert too_long == (f"has an id of {MAX_ID_LENGTH + 1} characters; use at most {MAX_ID_LENGTH} (ids name the "
                        "output files, and file names are limited to 255 bytes)")  # the module's stated reason
    wide = "é" * (MAX_ID_LENGTH // 2 + 1)
    size = len(wide.encode("utf-8"))
    assert id_problem(wide).startswith(f"has an id of {len(wide)} characters, {size} bytes of UTF-8; use at most ")
    for bad in ("a b", ".hidden", "a/b", "a@b", "a\\b"):
        assert id_problem(bad) == f"id {bad!r} must use letters, digits, '-', '_' or '.' (not first)", bad
    for good in ("a.b", "a-b_c", "ü", "A1"):
        assert id_problem(good) is None, good


def test_an_id_with_a_lone_surrogate_is_refused_not_a_crash(tmp_path):
    """JSON can spell a lone surrogate (``"\\ud800"``); measuring it must not raise.
    mutants: batch_items.x_id_problem__mutmut_* (the encoder's error handler)"""
    item, error = _one(tmp_path, '{"id": "x\\ud800", "prompt": "a"}')
    assert item is None and "must use letters" in error
    assert id_problem("\ud800" * (MAX_ID_LENGTH // 3 + 1)).startswith("has an id of")


def test_messages_show_an_id_quoted_and_a_long_one_shortened():
    """mutants: batch_items.x_shown_id__mutmut_*"""
    assert shown_id("a" * 40) == repr("a" * 40)
    assert shown_id("a" * 41) == repr("a" * 40) + "..."
    assert shown_id("abc", width=2) == repr("ab") + "..."


def test_a_rejected_items_failure_is_recorded_apart_from_the_id_it_shares():
    """'@' is in no valid id: the aside id never names a good item's files.
    mutants: batch_items.x_aside_id__mutmut_*"""
    assert aside_id("a", 3) == "a@line3" and aside_id("a", 0, 7) == "a@item7" and aside_id("a", 0) == "a@item0"
    assert id_problem(aside_id("a", 3)) is not None


# ---- items: defaults, the checks' order, duplicates -------------------------------------------
def test_an_items_id_and_seed_default_to_its_position(tmp_path):
    """``id`` defaults to the item's index (6 digits), ``seed`` to ``base_seed + index``; an empty
    value is "not given"; a numeric id is its text.
    mutants: batch_items.x__check__mutmut_*, batch_items.x_read_items__mutmut_*"""
    path = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", "id": "", "seed": ""}, {"prompt": "c", "id": 7, "seed": 3},
                             {"prompt": "d", "id": None, "seed": None, "height": None, "width": ""}])
    good, rejected = read_items(path, base_seed=100)
    assert rejected == []
    assert [(i.id, i.prompt, i.seed, i.settings, i.line) for i in good] == [
        ("000000", "a", 100, {}, 1), ("000001", "b", 101, {}, 2), ("7", "c", 3, {}, 3), ("000003", "d", 103, {}, 4)]
    assert all(type(i) is BatchItem for i in good)


def test_the_seed_from_base_seed_and_index_is_checked_too(tmp_path):
    """mutants: batch_items.x__check__mutmut_*"""
    path = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b"}])
    good, rejected = read_items(path, base_seed=MAX_SEED)
    assert [i.seed for i in good] == [MAX_SEED]
    assert rejected[0].error.endswith(f"seed {MAX_SEED + 1} (--seed + index) is out of range; use 0..{MAX_SEED}")


def test_every_call_key_present_is_passed_on_and_nothing_else(tmp_path):
    """mutants: batch_items.x__check__mutmut_*"""
    row = {"prompt": "a", "negative_prompt": "b", "num_inference_steps": 3, "guidance_scale": 2, "height": 64,
           "width": 72, "num_images_per_prompt": 2, "max_sequence_length": 77, "seed": 5, "id": "x"}
    item, error = _one(tmp_path, row)
    assert error is None
    assert item.settings == {k: (float(row[k]) if k == "guidance_scale" else row[k]) for k in CALL_KEYS}


@pytest.mark.parametrize("row, why", [
    ([1, 2], "is list, not an object with a 'prompt'"), ("text", "is str, not an object with a 'prompt'"),
    ({"id": "x"}, "has no 'prompt'"), ({"prompt": ""}, "has no 'prompt'"), ({"prompt": None}, "has no 'prompt'"),
    ({"prompt": "a", "steps": 3, "cfg": 1}, "has unknown key(s) 'cfg', 'steps'; known keys: " + ", ".join(KNOWN_KEYS)),
])
def test_an_item_that_is_not_one_says_why_with_its_line(tmp_path, row, why):
    """mutants: batch_items.x__check__mutmut_*, batch_items.x_read_items__mutmut_*"""
    path = _jsonl(tmp_path, [{"prompt": "ok"}, json.dumps(row)])
    good, rejected = read_items(path)
    assert [i.id for i in good] == ["000000"]
    shown = "'000001'" if not isinstance(row, dict) or "id" not in row else repr(row["id"])
    assert [(r.id, r.line, r.error) for r in rejected] == [
        ("000001" if shown == "'000001'" else row["id"], 2, f"p.jsonl:2: item {shown} {why}")]


def test_a_bad_id_is_refused_before_anything_else(tmp_path):
    """mutants: batch_items.x__check__mutmut_*"""
    item, error = _one(tmp_path, {"id": "a b", "steps": 1})
    assert error == "p.jsonl:1: item 'a b' id 'a b' must use letters, digits, '-', '_' or '.' (not first)"


def test_duplicates_are_caught_whatever_their_case_and_recorded_apart(tmp_path):
    """The first good item owns an id (compared casefolded: a.png and A.png are one file on macOS
    and Windows); a later good one with it, and a rejected line that has it, are recorded under
    ``<id>@line<N>``; a line that is not JSON whose default id is a good item's id too.
    mutants: batch_items.x_read_items__mutmut_*"""
    path = _jsonl(tmp_path, [{"id": "000002", "prompt": "x", "steps": 1}, {"id": "Straße", "prompt": "a"},
                             "not json", {"id": "STRASSE", "prompt": "b"}, {"id": "other", "prompt": "c"},
                             {"id": "000002", "prompt": "owner"}])
    good, rejected = read_items(path)
    assert [(i.id, i.line) for i in good] == [("Straße", 2), ("other", 5), ("000002", 6)]
    assert [(r.id, r.line) for r in rejected] == [("000002@line1", 1), ("000002@line3", 3), ("STRASSE@line4", 4)]
    assert rejected[1].error.startswith("p.jsonl:3: not JSON (") and rejected[1].error.endswith(
        "); one JSON object per line")
    assert rejected[2].error == ("p.jsonl:4: duplicate id 'STRASSE' (line 2 has it); ids name the output files")


# ---- the file: formats, encodings, what refuses it whole --------------------------------------
def test_a_jsonl_line_that_is_not_json_says_what_the_json_reader_says(tmp_path):
    """mutants: batch_items.x__rows__mutmut_*"""
    texts = ['{"prompt": "a"', "[" * 100_000]
    path = tmp_path / "p.ndjson"
    path.write_text("\n\n".join(texts) + "\n  \n")
    good, rejected = read_items(path)
    assert good == [] and [(r.id, r.line) for r in rejected] == [("000000", 1), ("000001", 3)]
    try:
        json.loads(texts[0])
    except ValueError as exc:
        assert rejected[0].error == f"p.ndjson:1: not JSON ({exc.msg}); one JSON object per line"
    assert rejected[1].error == "p.ndjson:3: not JSON (RecursionError); one JSON object per line"


def test_a_csv_is_read_as_pythons_csv_reader_reads_it(tmp_path):
    """Header names are trimmed; a cell with a line break keeps its item's line (where the row
    ends, as csv counts it); extra cells are an unknown key; a header without 'prompt' refuses the
    file, naming the known columns.
    mutants: batch_items.x__rows__mutmut_*"""
    text = ' id , prompt ,seed\na,"two\nlines",1\nb,plain,2,extra\n'
    path = tmp_path / "P.CSV"
    path.write_text(text)
    good, rejected = read_items(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    lines = []
    for _ in reader:
        lines.append(reader.line_num)
    assert [(i.id, i.prompt, i.seed, i.line) for i in good] == [("a", "two\nlines", 1, lines[0])]
    assert [(r.id, r.line) for r in rejected] == [("b", lines[1])]
    assert "unknown key(s) '(extra cells)'" in rejected[0].error
    (tmp_path / "h.csv").write_text("text,seed\nx,1\n")
    with pytest.raises(AutoFitUsageError) as info:
        read_items(tmp_path / "h.csv")
    assert str(info.value) == (f"{tmp_path / 'h.csv'}: the CSV header needs a 'prompt' column; known columns: "
                               + ", ".join(KNOWN_KEYS))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(AutoFitUsageError, match="needs a 'prompt' column"):
        read_items(tmp_path / "e.csv")


def test_a_text_file_is_one_prompt_a_line_trimmed(tmp_path):
    """mutants: batch_items.x__rows__mutmut_*"""
    path = tmp_path / "p.TXT"
    path.write_bytes("\ufeff a cat \n\n\t\na dog\r\n".encode("utf-8"))
    good, rejected = read_items(path, base_seed=1)
    assert [(i.id, i.prompt, i.seed, i.line) for i in good] == [("000000", "a cat", 1, 1), ("000001", "a dog", 2, 4)]


def test_a_file_that_cannot_be_read_is_refused_whole_with_why(tmp_path):
    """Not UTF-8 (the byte's offset), another format (the ones read), missing (the system's words).
    mutants: batch_items.x__rows__mutmut_*, batch_items.x_read_items__mutmut_*"""
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(AutoFitUsageError) as info:
        read_items(bad)
    try:
        bad.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        assert str(info.value) == f"{bad}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
    other = tmp_path / "p.yaml"
    other.write_text("prompt: a\n")
    with pytest.raises(AutoFitUsageError) as info:
        read_items(other)
    assert str(info.value) == f"{other}: use a .jsonl, .csv or .txt file of prompts (one prompt per line in .txt)"
    with pytest.raises(AutoFitUsageError) as info:
        read_items(tmp_path / "missing.jsonl")
    assert str(info.value) == f"{tmp_path / 'missing.jsonl'}: cannot read the prompts file (No such file or directory)"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_items_refuses_the_file_at_its_first_bad_item(tmp_path):
    """mutants: batch_items.x_load_items__mutmut_*"""
    path = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", "seed": -1}, {"prompt": ""}])
    good, rejected = read_items(path, base_seed=4)
    with pytest.raises(AutoFitUsageError) as info:
        load_items(path, base_seed=4)
    assert str(info.value) == rejected[0].error and rejected[0].line == 2
    ok = _jsonl(tmp_path, [{"prompt": "a"}], name="ok.jsonl")
    assert load_items(ok, base_seed=4) == read_items(ok, base_seed=4)[0] and load_items(ok, base_seed=4)[0].seed == 4
    # Without a base seed both readers number the seeds alike, from 0 (the CLI's --seed default).
    assert load_items(ok) == read_items(ok)[0] and [i.seed for i in load_items(ok)] == [0]


def test_a_csv_with_windows_line_ends_keeps_a_cells_own_line_break(tmp_path):
    """Read as the csv module says a file must be opened (``newline=""``): a quoted cell's CRLF is
    the cell's, kept as written.
    mutants: batch_items.x__rows__mutmut_14, _16"""
    path = tmp_path / "p.csv"
    path.write_bytes(b'id,prompt\r\na,"two\r\nlines"\r\nb,"cr\ronly"\r\n')
    with open(path, newline="", encoding="utf-8-sig") as f:
        expected = [row["prompt"] for row in csv.DictReader(f)]
    good, rejected = read_items(path)
    assert rejected == [] and [i.prompt for i in good] == expected == ["two\r\nlines", "cr\ronly"]


def test_a_csv_with_old_mac_line_ends_is_read_as_the_csv_module_reads_it(tmp_path):
    """Bare CR line ends (old Excel for Mac) are line ends, as for ``csv`` on a file opened with
    ``newline=""``.
    mutants: batch_items.x__rows__mutmut_16"""
    path = tmp_path / "p.csv"
    path.write_bytes(b"id,prompt\ra,a cat\rb,a dog\r")
    with open(path, newline="", encoding="utf-8-sig") as f:
        expected = [(row["id"], row["prompt"]) for row in csv.DictReader(f)]
    good, rejected = read_items(path)
    assert rejected == [] and [(i.id, i.prompt) for i in good] == expected == [("a", "a cat"), ("b", "a dog")]
