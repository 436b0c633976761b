"""``engramlm store verify|inspect`` on a good and a corrupted file."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch

from engramlm.cli import store_cmd
from engramlm.errors import CorruptFileError
from engramlm.store.file import write_store


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    store_cmd.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_verify_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.engst"
    fp = hashlib.sha256(b"s").hexdigest()
    write_store(path, torch.randn(50, 32), "fp32", fp, {"hash_spec": {"k": 1}})
    args = _parse(["store", "verify", str(path), "--fingerprint", fp])
    assert args.func(args) == 0
    assert "OK (50 rows x 32, fp32" in capsys.readouterr().out
    args = _parse(["store", "inspect", str(path)])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"] == fp and info["meta"] == {"hash_spec": {"k": 1}}
    data = bytearray(path.read_bytes())
    data[info["data_offset"] + 3] ^= 1
    path.write_bytes(bytes(data))
    args = _parse(["store", "verify", str(path)])
    with pytest.raises(CorruptFileError, match="chunk 0"):
        args.func(args)
