"""The checked-in stubs are what the .proto generates: one source of truth."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("retriever_pb2.py", "retriever_pb2.pyi", "retriever_pb2_grpc.py")


def test_regenerating_stubs_changes_nothing(tmp_path):
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
               f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "retrieval/v1/retriever.proto"]
    subprocess.run(command, check=True, cwd=ROOT)
    for name in GENERATED:
        fresh = (tmp_path / "retrieval" / "v1" / name).read_text()
        checked_in = (ROOT / "proto" / "retrieval" / "v1" / name).read_text()
        assert fresh == checked_in, f"proto/retrieval/v1/{name} is stale: run scripts/gen_proto.sh"


def test_stubs_import_as_package():
    from retrieval.v1 import retriever_pb2, retriever_pb2_grpc

    assert retriever_pb2.DESCRIPTOR.package == "retrieval.v1"
    assert hasattr(retriever_pb2_grpc, "RetrieverStub")
