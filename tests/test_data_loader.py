"""BatchLoader / EvalLoader: shifted targets, doc_start flags, exact resume, full eval sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlm.data import BatchLoader, EvalLoader, TokenDataset, prepare
from engramlm.errors import ConfigError

B, T = 4, 64


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loader") / "prep"
    prepare("stdlib", path, 400, max_bytes=60_000, progress=False)
    return path


def test_train_batches_shift_and_doc_start(out: Path) -> None:
    ds = TokenDataset(out, "train")
    loader = BatchLoader(ds, B, T, seed=3)
    stream = np.asarray(ds.tokens).astype(np.int64)
    starts = set(ds.doc_offsets.tolist())
    for step in range(40):
        offs = loader.window_starts(step)
        batch = next(loader)
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (B, T)
        assert batch["doc_start"].dtype == torch.bool
        for b, o in enumerate(offs.tolist()):
            assert batch["input_ids"][b].tolist() == stream[o : o + T].tolist()
            assert batch["targets"][b].tolist() == stream[o + 1 : o + T + 1].tolist()
            want = [o + t in starts for t in range(T)]
            assert batch["doc_start"][b].tolist() == want
        # every document starts with BOS, and BOS appears nowhere else
        assert torch.equal(batch["doc_start"], batch["input_ids"] == ds.bos_id)
        assert torch.equal(batch["loss_mask"], batch["targets"] != ds.bos_id)


def test_doc_start_at_window_edges(out: Path) -> None:
    ds = TokenDataset(out, "train")
    assert ds.n_documents >= 2
    s = int(ds.doc_offsets[1])
    loader = BatchLoader(ds, 3, T, seed=0)
    loader.window_starts = lambda step: np.array([s, s - 1, s - T + 1])  # type: ignore[method-assign]
    flags = next(loader)["doc_start"]
    assert flags[0, 0] and not flags[0, 1:].any()  # a document begins exactly at position 0
    assert not flags[1, 0] and flags[1, 1]  # mid-document window: position 0 is not a start
    assert flags[2, T - 1] and not flags[2, : T - 1].any()


def test_resume_yields_identical_batches(out: Path) -> None:
    ds = TokenDataset(out, "train")
    a = BatchLoader(ds, B, T, seed=11)
    for _ in range(3):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    rest_a = [next(a) for _ in range(4)]
    b = BatchLoader(ds, B, T, seed=11)
    b.load_state_dict(state)
    rest_b = [next(b) for _ in range(4)]
    for x, y in zip(rest_a, rest_b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(
        next(BatchLoader(ds, B, T, seed=12))["input_ids"], BatchLoader(ds, B, T, seed=11).batch_at(0)["input_ids"]
    )
    with pytest.raises(ConfigError, match="seed"):
        BatchLoader(ds, B, T, seed=12).load_state_dict(state)
    with pytest.raises(ConfigError, match="seq_len"):
        BatchLoader(ds, B, T + 1, seed=11).load_state_dict(state)


def test_row_ids_fn_called_in_pipeline(out: Path) -> None:
    ds = TokenDataset(out, "val")
    calls: list[tuple[torch.Size, torch.Size]] = []

    def fake_hasher(ids: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
        calls.append((ids.shape, doc_start.shape))
        return ids * 2 + doc_start.long()

    batch = next(BatchLoader(ds, B, T, seed=0, row_ids_fn=fake_hasher))
    assert calls == [((B, T), (B, T))]
    assert torch.equal(batch["row_ids"], batch["input_ids"] * 2 + batch["doc_start"].long())
    ev = next(iter(EvalLoader(ds, B, T, row_ids_fn=fake_hasher)))
    assert "row_ids" in ev


def test_eval_covers_every_token_once_with_exact_bytes(out: Path) -> None:
    ds = TokenDataset(out, "val")
    ev = EvalLoader(ds, 3, 50)
    targets, n_scored, n_bytes, batches = [], 0, 0, 0
    for batch in ev:
        batches += 1
        valid = batch["targets"] != ds.pad_id
        targets += batch["targets"][valid].tolist()
        n_scored += int(batch["loss_mask"].sum())
        n_bytes += int(batch["target_bytes"].sum())
        assert not batch["doc_start"][~(batch["input_ids"] != ds.pad_id)].any()
    assert batches == len(ev)
    assert targets == np.asarray(ds.tokens)[1:].astype(np.int64).tolist()
    assert n_scored == ds.n_tokens - 1 - (ds.n_documents - 1)  # BOS targets are not scored
    assert n_bytes == ev.total_bytes == ds.n_bytes


def test_shape_errors(out: Path) -> None:
    ds = TokenDataset(out, "test")
    with pytest.raises(ConfigError, match="seq_len"):
        BatchLoader(ds, 2, ds.n_tokens)
    with pytest.raises(ConfigError):
        EvalLoader(ds, 0, 8)
