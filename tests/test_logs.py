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
