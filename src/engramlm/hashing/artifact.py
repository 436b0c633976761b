"""The hash artefact (spec §3.4): compression map + multipliers + primes + spec, in one file.

Saved next to every model so the 129k-entry map is reloaded, never rebuilt. Loading recomputes
the multipliers with NumPy and refuses any difference, and checks the stored fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engramlm.errors import CorruptFileError
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashLayout, HashSpec, make_layout
from engramlm.utils.io import atomic_write_bytes

ARTIFACT_FORMAT = "engramlm.hash_artifact"
ARTIFACT_VERSION = 1


def save_layout(layout: HashLayout, path: str | Path) -> None:
    from safetensors.torch import save

    tensors = dict(layout.compression.to_tensors())
    tensors["multipliers"] = torch.from_numpy(layout.multipliers.copy())
    tensors["primes"] = torch.from_numpy(layout.primes.copy())
    meta = {k: str(v) for k, v in layout.compression.to_metadata().items()}
    meta.update(
        artifact_format=ARTIFACT_FORMAT,
        artifact_version=str(ARTIFACT_VERSION),
        hash_spec=json.dumps(layout.spec.to_dict(), sort_keys=True),
        fingerprint=layout.fingerprint,
    )
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_layout(path: str | Path) -> HashLayout:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise CorruptFileError(f"{p}: hash artefact not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CorruptFileError(f"{p}: not a readable safetensors file: {exc}") from exc
    if meta.get("artifact_format") != ARTIFACT_FORMAT or meta.get("artifact_version") != str(ARTIFACT_VERSION):
        raise CorruptFileError(
            f"{p}: not an engramlm hash artefact v{ARTIFACT_VERSION} "
            f"(format={meta.get('artifact_format')!r}, version={meta.get('artifact_version')!r})"
        )
    cmap = CompressionMap.from_parts(tensors, meta)
    try:
        spec = HashSpec.from_dict(json.loads(meta["hash_spec"]))
    except (KeyError, ValueError) as exc:
        raise CorruptFileError(f"{p}: bad hash_spec entry: {exc}") from exc
    layout = make_layout(spec, cmap, tensors["multipliers"].numpy())
    if not torch.equal(tensors["primes"], torch.from_numpy(layout.primes)):
        raise CorruptFileError(f"{p}: stored primes differ from the prime plan of its hash spec")
    layout.check_fingerprint(meta.get("fingerprint", ""), what=f"hash artefact {p}")
    return layout
