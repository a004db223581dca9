"""Logs that behave in a library: nothing on stdout, levels an operator filters on, short lines."""

import json
import logging

import pytest
import structlog

from autofit import autofit
from autofit.events import emit
from autofit.testing import inject_oom, tiny_sdxl

from helpers import run


@pytest.fixture
def unconfigured_structlog():
    """structlog as an application that never configured it has it (restored afterwards)."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        yield
    finally:
        structlog.configure(**saved)


def test_by_default_nothing_reaches_stdout_and_warnings_reach_stdlib(unconfigured_structlog, capsys, caplog):
    """Without structlog configured: no line on stdout; events go to the stdlib logger 'autofit'
    at operator levels; the application's logging and structlog configuration are left alone."""
    root_handlers = list(logging.getLogger().handlers)
    caplog.set_level(logging.DEBUG, logger="autofit")
    proxy = autofit(tiny_sdxl(), cache=False)
    with inject_oom(proxy, stage="decode"):
        run(proxy, "sdxl", num_inference_steps=1)
    assert "autofit." not in capsys.readouterr().out
    levels = {r.autofit["event"]: r.levelname for r in caplog.records if r.name == "autofit"}
    assert levels["autofit.wrapped"] == "INFO"
    assert levels["autofit.escalate"] == levels["autofit.recovered"] == "WARNING"
    assert levels["autofit.rung_skipped"] == "DEBUG"  # vae_slicing: nothing to slice in a batch of one
    assert not structlog.is_configured()
    assert logging.getLogger().handlers == root_handlers and logging.getLogger("autofit").handlers == []


def test_lines_carry_only_informative_fields(unconfigured_structlog, caplog):
    """No None, empty or placeholder fields; the wrap line is short."""
    caplog.set_level(logging.INFO, logger="autofit")
    autofit(tiny_sdxl(), cache=False)
    (record,) = [r for r in caplog.records if r.autofit["event"] == "autofit.wrapped"]
    assert all(v not in (None, "", ()) for v in record.autofit.values())
    assert "action" not in record.autofit and "adopted" not in record.autofit
    assert len(record.getMessage()) < 200, record.getMessage()


def test_an_application_that_configured_structlog_gets_the_events_there():
    """With structlog configured (here: capture_logs), events go through it, with levels."""
    with structlog.testing.capture_logs() as logs:
        emit("escalate", stage="decode", action="vae_tiling", attempt=1, component=None)
        emit("rung_skipped", stage="decode", action="vae_slicing", reason="batch of one")
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("autofit.escalate", "warning"), ("autofit.rung_skipped", "debug")]
    assert "component" not in logs[0]


def test_cli_keeps_stdout_for_results(capsys, monkeypatch):
    """Under the CLI, events a command emits go to stderr and stdout holds only its result."""
    import autofit.cli
    import autofit.cli.doctor

    doctor = autofit.cli.doctor.cmd_doctor

    def doctor_that_escalates(args):  # an event emitted while the command runs
        emit("escalate", stage="decode", action="vae_tiling", attempt=1)
        return doctor(args)

    monkeypatch.setattr(autofit.cli.doctor, "cmd_doctor", doctor_that_escalates)
    assert autofit.cli.main(["doctor", "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # nothing but the report
    assert "autofit.escalate" in captured.err
