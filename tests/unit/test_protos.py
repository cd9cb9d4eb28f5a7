"""The committed stubs must match what the .proto files generate."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    out = tmp_path / "out"
    out.mkdir()
    env_path = Path(sys.executable).parent
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / "gen-protos.sh"), str(out)],
        cwd=ROOT, capture_output=True, text=True,
        env={"PATH": f"{env_path}:/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert generated, "generator produced nothing"
    committed_dir = ROOT / "protos"
    stale = [str(rel) for rel in generated
             if not (committed_dir / rel).exists() or not filecmp.cmp(out / rel, committed_dir / rel, shallow=False)]
    assert not stale, f"stubs drifted from .proto files, run scripts/gen-protos.sh: {stale}"
    expected = {p.relative_to(committed_dir) for p in committed_dir.rglob("*_pb2*.py*")
                if "__pycache__" not in p.parts}
    assert expected == set(generated), "committed stubs without a .proto (or vice versa)"
    shutil.rmtree(out)


def test_stubs_import_without_path_tricks() -> None:
    from skiff.v1 import images_pb2, images_pb2_grpc, system_pb2_grpc

    assert images_pb2.PullRequest(reference="x").reference == "x"
    assert hasattr(images_pb2_grpc, "ImagesStub") and hasattr(system_pb2_grpc, "SystemStub")
