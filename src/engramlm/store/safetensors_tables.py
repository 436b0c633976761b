"""Tables in place in safetensors files: a layer's ``embed.weight`` (+ ``embed.scale``) read where it lies.

DeepSeek-V4.1 ships each Engram table as two tensors (spec §11.2): ``layers.{L}.engram.embed.weight``
(F8_E4M3 [R, 256]) and ``layers.{L}.engram.embed.scale`` (F8_E8M0 [R, 8], one ue8m0 exponent per
32 values). At 94 GiB per layer they must be served where they lie, so this tier parses the
safetensors header itself (8-byte length + JSON; no dependency on the safetensors package knowing
F8_E8M0), memory-maps both tensors and reads only the requested rows, dequantising per gather.
engramlm's saved models (``models.io.save_pretrained``'s ``model.safetensors``) use the same tensor
names with dense F32/BF16 tables and no scale; they are served the same way.

Shards: ``path`` may be one ``.safetensors`` file or a directory; in a directory the tensor is
located through ``model.safetensors.index.json`` (``weight_map``) or, without an index, by
scanning every ``*.safetensors`` header. Weight and scale may sit in different shards.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engramlm.errors import CorruptFileError
from engramlm.store.base import RowTable, TableHeader, check_fingerprint
from engramlm.store.formats import BF16, FP8, FP8_BLOCK, FP32, RowFormat, decode_split
from engramlm.store.pages import PAGE

WEIGHT_NAME = "layers.{layer}.engram.embed.weight"
SCALE_NAME = "layers.{layer}.engram.embed.scale"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.engram\.embed\.weight$")
_HEADER_MAX = 100 << 20
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "U8": 1}
_DENSE = {"F32": (FP32, torch.float32), "BF16": (BF16, torch.bfloat16)}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: file, absolute byte offset, dtype name and shape."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Tensor name -> location, validated against the file size (a truncated shard is refused)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_HEADER_MAX, size - 8):
                raise CorruptFileError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
            doc = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read safetensors file: {exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    base = 8 + n
    out: dict[str, TensorLocation] = {}
    for name, info in doc.items():
        if name == "__metadata__":
            continue
        start, end = (int(x) for x in info["data_offsets"])
        loc = TensorLocation(str(path), base + start, str(info["dtype"]), tuple(int(s) for s in info["shape"]))
        if base + end > size:
            raise CorruptFileError(f"{path}: tensor {name} ends at byte {base + end}, file has {size} (truncated?)")
        if loc.dtype in _ITEMSIZE and loc.nbytes != end - start:
            raise CorruptFileError(
                f"{path}: tensor {name} spans {end - start} bytes, {loc.dtype}{loc.shape} needs {loc.nbytes}"
            )
        out[name] = loc
    return out


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({f for k, f in weight_map.items() if _LAYER_RE.match(k) or ".engram.embed.scale" in k})
        return [path / f for f in files]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CorruptFileError(f"{path}: no .safetensors files")
    return shards


def find_engram_tensors(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Locations of every ``layers.*.engram.embed.{weight,scale}`` tensor under ``path``."""
    found: dict[str, TensorLocation] = {}
    for shard in _shards(Path(path)):
        for name, loc in read_safetensors_header(shard).items():
            if ".engram.embed." in name:
                found[name] = loc
    return found


def _memmap(loc: TensorLocation) -> np.memmap:
    """Rows as raw bytes [rows, row_bytes]: only the pages of rows actually read get faulted in."""
    rows = loc.shape[0]
    return np.memmap(loc.path, dtype=np.uint8, mode="r", offset=loc.offset, shape=(rows, loc.nbytes // max(rows, 1)))


class SafetensorsTable(RowTable):
    """One Engram layer's table served in place from safetensors (split fp8 or dense fp32/bf16).

    A DeepSeek release carries no engramlm fingerprint, so the caller passes the fingerprint of the
    layout it will hash with (e.g. the ``deepseek-v4.1`` preset's) and, ideally, ``expected_rows``
    (R_ℓ from that layout): a table of another size cannot belong to that layout.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layer_id: int,
        fingerprint: str,
        *,
        expected_rows: int | None = None,
        locations: dict[str, TensorLocation] | None = None,
    ) -> None:
        self.layer_id = int(layer_id)
        fp = check_fingerprint(fingerprint)  # refuse a bad fingerprint before touching any file
        locs = locations if locations is not None else find_engram_tensors(path)
        wname, sname = WEIGHT_NAME.format(layer=layer_id), SCALE_NAME.format(layer=layer_id)
        if wname not in locs:
            have = sorted(int(m.group(1)) for k in locs if (m := _LAYER_RE.match(k)))
            raise CorruptFileError(f"{path}: no tensor {wname}; Engram layers present: {have}")
        w = locs[wname]
        if len(w.shape) != 2:
            raise CorruptFileError(f"{w.path}: {wname} must be 2-D [rows, dim], got shape {list(w.shape)}")
        rows, dim = w.shape
        if expected_rows is not None and rows != int(expected_rows):
            raise CorruptFileError(
                f"{w.path}: {wname} has {rows} rows, but the hash layout expects {int(expected_rows)} "
                f"for layer {layer_id}"
            )
        self.weight_location = w
        self.scale_location: TensorLocation | None = None
        if w.dtype == "F8_E4M3":
            if sname not in locs:
                raise CorruptFileError(f"{w.path}: {wname} is F8_E4M3 but {sname} (its ue8m0 scales) is missing")
            s = locs[sname]
            want = (rows, dim // FP8_BLOCK)
            if dim % FP8_BLOCK or s.shape != want:
                raise CorruptFileError(f"{s.path}: {sname} has shape {list(s.shape)}, expected {list(want)}")
            if s.dtype not in ("F8_E8M0", "U8"):
                raise CorruptFileError(f"{s.path}: {sname} has dtype {s.dtype}, expected F8_E8M0 (ue8m0 exponents)")
            self.scale_location = s
            self._format: RowFormat = FP8
            self._weight = _memmap(w)
            self._scale = _memmap(s)
        elif w.dtype in _DENSE:
            self._format, self._torch_dtype = _DENSE[w.dtype]
            self._weight = _memmap(w)
            self._scale = None
        else:
            raise CorruptFileError(f"{w.path}: {wname} has dtype {w.dtype}; expected F8_E4M3 (+ scale), F32 or BF16")
        super().__init__(TableHeader(rows, dim, fp, self._format))

    def _pages(self, loc: TensorLocation, idx: np.ndarray, row_bytes: int) -> int:
        start = loc.offset + idx * row_bytes
        return int(np.union1d(start // PAGE, (start + row_bytes - 1) // PAGE).size)

    def _fetch_unique(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        w = torch.from_numpy(np.ascontiguousarray(self._weight[idx]))
        pages = self._pages(self.weight_location, idx, w.shape[1])
        if self._scale is not None:
            s = torch.from_numpy(np.ascontiguousarray(self._scale[idx]))
            pages += self._pages(self.scale_location, idx, s.shape[1])  # type: ignore[arg-type]
            self.stats.add(bytes_read=pages * PAGE)
            return decode_split(w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu))
        self.stats.add(bytes_read=pages * PAGE)
        return w.view(self._torch_dtype)

    def read_block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 (sequential export; no id bookkeeping)."""
        return self._fetch_unique(torch.arange(start, stop, dtype=torch.int64)).float()

    def read_raw_block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as packed records of :attr:`row_format` (fp8: values then scales)."""
        w = torch.from_numpy(np.array(self._weight[start:stop]))
        if self._scale is None:
            return w
        s = torch.from_numpy(np.array(self._scale[start:stop]))
        return torch.cat([w, s], dim=1)

    def close(self) -> None:
        # Dropping the references unmaps; np.memmap has no explicit close.
        self._weight = self._weight[:0]
        if self._scale is not None:
            self._scale = self._scale[:0]


def open_safetensors_tables(
    path: str | os.PathLike,
    fingerprint: str,
    *,
    expected_rows: dict[int, int] | None = None,
) -> dict[int, SafetensorsTable]:
    """Every Engram layer's table in a safetensors file or shard directory (e.g. a saved model's weights or
    DeepSeek-V4.1's release), keyed by layer id."""
    locs = find_engram_tensors(path)
    layers = sorted(int(m.group(1)) for k in locs if (m := _LAYER_RE.match(k)))
    if not layers:
        raise CorruptFileError(f"{path}: no layers.*.engram.embed.weight tensors")
    if expected_rows is not None and set(expected_rows) != set(layers):
        raise CorruptFileError(f"{path}: Engram layers {layers}, but the hash layout has {sorted(expected_rows)}")
    return {
        layer: SafetensorsTable(
            path, layer, fingerprint, expected_rows=(expected_rows or {}).get(layer), locations=locs
        )
        for layer in layers
    }
