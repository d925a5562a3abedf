"""Structured logs: one JSON object per record, with the fields a call passed as `extra`."""

import json
import logging

from retriever_server.logs import JsonFormatter


def test_json_records_carry_their_extra_fields():
    name = "retriever_server.serving.service"
    record = logging.LogRecord(name, logging.INFO, __file__, 1, "search %s", ("done",), None)
    record.status, record.nq, record.ms = "OK", 64, 1.25
    body = json.loads(JsonFormatter().format(record))
    assert body["msg"] == "search done" and body["level"] == "INFO" and body["logger"] == name
    assert (body["status"], body["nq"], body["ms"]) == ("OK", 64, 1.25)
    assert body["ts"].endswith("Z")


def test_exceptions_are_kept_in_one_json_line():
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc"]


def test_a_commands_last_line_is_json_under_log_format_json(tmp_path):
    """With --log-format json every line on stderr is a JSON object, the command's error line too (it was
    text: a log pipeline lost the one line saying why the process ended); in text it is as it was."""
    import subprocess
    import sys

    missing = str(tmp_path / "nowhere")
    error = f"retriever-server info: error: {missing!r} is neither a datastore directory nor a server's HOST:PORT"
    for fmt in ("json", "text"):
        done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "--log-format", fmt, "info", missing],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        if fmt == "json":
            bodies = [json.loads(line) for line in lines]  # every line
            assert (bodies[-1]["level"], bodies[-1]["logger"], bodies[-1]["msg"]) == ("ERROR", "retriever-server",
                                                                                     error)
        else:
            assert lines[-1] == error
