"""`--address-file` (serve, router, deploy) reads, replaces and removes only a regular file holding a
server's address, or an empty one made in advance (`mktemp`): a named pipe, a socket, a device, a symbolic
link, an oversized file or one holding anything else is refused in one line and left as it is (a character
device was deleted and replaced, a pipe hung the command, /dev/zero was read without end). A name the
start-up check accepts is one the address can be written to. A server whose stdout reader is gone before it
says where it listens stops, in one line, and leaves no address file behind."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import manifest_without_shard_files

from retriever_server import cli
from retriever_server.cli.address_file import prepare_address_file, remove_address, write_address
from retriever_server.cli.common import CliError

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # a log record, not the command's line


def command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "retriever_server.cli", *argv]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def stale(path: Path) -> None:
    """An address file of a server that has stopped (pid 0 is nobody's)."""
    path.write_text(json.dumps({"address": "127.0.0.1:1", "pid": None, "name": "gone"}))


def test_a_named_pipe_is_refused_in_one_line_without_reading_it(tmp_path):
    """It used to be opened for reading: the command hung for ever."""
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    done = subprocess.run(command("router", "--shards", "127.0.0.1:1", "--metrics-port", "-1", "--address-file",
                                  str(pipe)), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and error_lines(done.stderr) == [
        f"retriever-server router: error: --address-file {pipe} is a named pipe, not a regular file: give the "
        "name of a file to write"], done.stderr
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_a_socket_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "s.json"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        with pytest.raises(CliError, match=r"is a socket, not a regular file: give the name of a file to write"):
            prepare_address_file(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_symbolic_link_is_refused_and_neither_it_nor_its_target_is_touched(tmp_path):
    """Even one to a stale address file: what it points at is not this command's to replace."""
    target = tmp_path / "elsewhere.json"
    stale(target)
    link = tmp_path / "a.json"
    link.symlink_to(target)
    before = target.read_text()
    with pytest.raises(CliError, match=r"is a symbolic link: give the name of a file to write"):
        prepare_address_file(link)
    assert link.is_symlink() and target.read_text() == before
    remove_address(link, stale=True)  # nor is it removed when a server stops
    assert link.is_symlink()


def test_a_link_to_a_device_is_refused(tmp_path):
    link = tmp_path / "null.json"
    link.symlink_to(os.devnull)
    with pytest.raises(CliError, match=r"is a symbolic link"):
        prepare_address_file(link)
    assert link.is_symlink()


@pytest.mark.parametrize("body", ["{}", "not json\n", json.dumps({"address": "127.0.0.1:1", "pid": None,
                                                                      "pad": "x" * (2 << 20)})],
                         ids=["other json", "text", "oversized"])
def test_a_file_of_other_content_or_oversized_is_not_taken_for_an_address_file(tmp_path, body):
    path = tmp_path / "a.json"
    path.write_text(body)
    with pytest.raises(CliError, match=r"holds something other than a server's address: refusing to replace it"):
        prepare_address_file(path)
    assert path.read_text() == body


@pytest.mark.parametrize("body", ["", "\n  \t\n"], ids=["empty", "blank"])
def test_an_empty_file_made_in_advance_is_accepted_and_replaced(tmp_path, body):
    """`ADDR=$(mktemp)` was refused as "something other than a server's address"; a link to one still is."""
    path = tmp_path / "a.json"
    path.write_text(body)
    (tmp_path / "link.json").symlink_to(path)
    with pytest.raises(CliError, match=r"is a symbolic link"):
        prepare_address_file(tmp_path / "link.json")
    prepare_address_file(path)
    write_address(path, "127.0.0.1:5", None)
    assert json.loads(path.read_text())["address"] == "127.0.0.1:5"


@pytest.mark.parametrize("length", range(236, 244))
def test_a_name_accepted_at_start_up_is_one_the_address_can_be_written_to(tmp_path, length):
    """The start-up probe's name was 4-6 characters shorter than the temporary file's: a name of 234-239
    characters passed, the server bound, and writing its address failed with ENAMETOOLONG."""
    path = tmp_path / ("a" * (length - 5) + ".json")
    try:
        prepare_address_file(path)
    except CliError as err:
        assert "cannot write there" in str(err)
        assert list(tmp_path.iterdir()) == []
        return
    write_address(path, "127.0.0.1:5", None)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_a_stale_address_file_is_still_replaced(tmp_path):
    path = tmp_path / "a.json"
    stale(path)
    prepare_address_file(path)
    assert not path.exists()


def test_the_address_is_not_written_through_a_link_planted_beside_it(tmp_path):
    """It went through NAME.tmp, a fixed name: a link there had the address written into its target, and the
    link itself renamed into place."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (tmp_path / "a.json.tmp").symlink_to(victim)
    path = tmp_path / "a.json"
    write_address(path, "127.0.0.1:5", None)
    assert victim.read_text() == "keep\n"
    assert not path.is_symlink() and json.loads(path.read_text())["address"] == "127.0.0.1:5"
    remove_address(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json.tmp", "victim.txt"]  # nothing of its own left


def test_a_router_whose_output_reader_is_gone_stops_in_one_line_and_removes_its_address_file(tmp_path):
    """It ended 0 with a traceback ("Event loop is closed", "was never awaited"), its address file left
    pointing at a server that had stopped."""
    address_file = tmp_path / "router.json"
    router = subprocess.Popen(command("router", "--shards", "127.0.0.1:1", "--metrics-port", "-1",
                                      "--address-file", str(address_file)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    router.stdout.close()  # no reader: its first line fails
    try:
        _, err = router.communicate(timeout=30)
    finally:
        if router.poll() is None:
            router.kill()
            router.wait()
    assert router.returncode == 1, err
    assert error_lines(err) == ["retriever-server router: error: stdout was closed before the server could say "
                                "where it listens (its reader is gone): stopped"], err
    assert not address_file.exists()


@pytest.fixture
def datastore(tmp_path: Path) -> Path:
    """A datastore whose manifest is valid but whose shard file is missing: a shard that got as far as
    loading fails there, so a refusal proves the flag was refused first."""
    return manifest_without_shard_files(tmp_path / "ds")


@pytest.mark.parametrize("flags", [["--no-restart"], ["--no-pin-shards"], ["--replicas", "2"],
                                   ["--startup-timeout", "10"], ["--hedge-delay-ms", "5"], ["--no-hedge"],
                                   ["--replicas", "3", "--no-hedge"]], ids=lambda f: " ".join(f))
def test_a_lone_shard_refuses_flags_of_a_whole_local_deployment(monkeypatch, capsys, datastore, flags):
    """They were accepted and ignored, while --replica without --shard was refused."""
    monkeypatch.setattr(cli, "configure_logging", lambda *a: None)
    code = cli.main(["serve", "--datastore", str(datastore), "--shard", "0", "--metrics-port", "-1", *flags])
    err = capsys.readouterr().err
    named = [f for f in flags if f.startswith("--")]
    assert code == 1 and error_lines(err) == [
        f"retriever-server serve: error: {' and '.join(named)} {'apply' if len(named) > 1 else 'applies'} only "
        "without --shard (to the shards and the router serve starts then): --shard 0 serves that shard alone; "
        f"drop {'them' if len(named) > 1 else 'it'}"], err
