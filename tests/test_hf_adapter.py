"""``engramlm.hf.adapter``: Engram added to random-initialised HF Llama / Qwen2 / GPT-2 models.

Real text and a real tokenizer: a byte-level BPE trained on the repository's docs, wrapped as an HF
``PreTrainedTokenizerFast``; the models are small random configs (no hub).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engramlm.data.tokenizer import train_tokenizer  # noqa: E402
from engramlm.errors import ConfigError, ForeignTokenizerError, HashSpecMismatch  # noqa: E402
from engramlm.hf.adapter import (  # noqa: E402
    ADAPTER_CONFIG,
    add_engram,
    compression_map_of,
    engram_optimizers,
    load_engram,
    save_engram,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_tokenizer(texts: list[str], vocab: int):
    tok = train_tokenizer(texts, vocab_size=vocab)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """The repository's prose as documents of ~4 kB (the docs change, the tests only need real text)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return [text[i : i + 4000] for i in range(0, len(text), 4000)]


@pytest.fixture(scope="module")
def tok(texts: list[str]):
    return _hf_tokenizer(texts, 400)


def _model(arch: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    common = {"vocab_size": vocab}
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=1, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # fmt: skip
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, **common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw, **common)).eval()


def _randomise(adapter) -> None:
    """Draw the zero-initialised parts: a no-op Engram would pass every equality below."""
    with torch.no_grad():
        for blk in adapter.blocks.values():
            blk.wkv.weight.normal_(std=0.3)
            if blk.conv is not None:
                blk.conv.weight.normal_(std=0.3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_insertion_leaves_logits_identical_then_engram_changes_them(arch: str, tok, texts: list[str]) -> None:
    model = _model(arch, len(tok))
    a, b = tok.encode(texts[0][:400]), tok.encode(texts[1][:400])
    ids = torch.tensor([a[:60], b[:60]])
    with torch.no_grad():
        before = model(ids).logits
    adapter = add_engram(model, tok, layers=[0, 2], seed=0)
    assert model.engram_adapter is adapter and adapter.layer_ids == (0, 2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    _randomise(adapter)
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(after, before)
    # The base model's parameter names are untouched; the adapter adds its own prefix.
    assert all(not k.startswith("engram_adapter.") or ".blocks." in k for k in model.state_dict())


def test_row_ids_are_the_engramlm_hasher_over_the_tokenizer_compression_map(tok, texts: list[str]) -> None:
    from engramlm.hashing.batch import NgramHasher
    from engramlm.hashing.spec import make_layout

    model = _model("llama", len(tok))
    adapter = add_engram(
        model, tok, layers=[1], max_ngram_size=4, n_head_per_ngram=2, engram_vocab_size=[997, 1009, 1013]
    )
    cmap = compression_map_of(tok)
    assert adapter.layout.compression.digest() == cmap.digest() and cmap.compressed_vocab_size < len(tok)
    assert adapter.layout.spec.pad_id == tok.pad_token_id
    ids = torch.tensor([tok.encode(texts[2][:300])])
    with torch.no_grad():
        model(ids)
    want = NgramHasher(make_layout(adapter.layout.spec, cmap))(ids)[0]
    assert torch.equal(adapter._step.row_ids[1], want)


def test_left_padding_hashes_like_the_unpadded_row(tok, texts: list[str]) -> None:
    model = _model("llama", len(tok))
    adapter = add_engram(model, tok, layers=[1], seed=0)
    ids = torch.tensor(tok.encode(texts[0][:200]))
    padded = torch.cat([torch.full((5,), tok.pad_token_id), ids]).unsqueeze(0)
    mask = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(len(ids), dtype=torch.long)]).unsqueeze(0)
    plain = adapter.begin(ids.unsqueeze(0), None, 0, cached=False).row_ids[1]
    step = adapter.begin(padded, mask, 0, cached=False)
    assert torch.equal(step.row_ids[1][:, 5:], plain)
    assert step.dead[0, :5].all() and not step.dead[0, 5:].any()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generate_equals_full_recompute(arch: str, tok, texts: list[str]) -> None:
    model = _model(arch, len(tok), seed=1)
    adapter = add_engram(model, tok, layers=[1], seed=0)
    _randomise(adapter)
    prompt = torch.tensor([tok.encode(texts[3][:120])])
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert adapter._stream is not None and adapter._stream.length == cached.shape[1] - 1  # stepped with history
    full = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12, use_cache=False)
    assert cached.tolist() == full.tolist()
    # A continuation whose history the adapter does not hold is refused, not silently mis-hashed.
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)
        adapter._stream = None
        with pytest.raises(ConfigError, match="Engram history"):
            model(prompt[:, -1:], cache=cache, use_cache=True)


def _batches(tok, texts: list[str], seq: int = 48, batch: int = 4) -> list[torch.Tensor]:
    ids = [i for t in texts for i in tok.encode(t)]
    rows = torch.tensor(ids[: (len(ids) // seq) * seq]).view(-1, seq)
    return [rows[i : i + batch] for i in range(0, 20 * batch, batch)]


def test_plain_loop_trains_20_steps_with_sparse_table_updates(tok, texts: list[str]) -> None:
    model = _model("llama", len(tok)).train()
    adapter = add_engram(model, tok, layers=[1], seed=0)
    opt, sched = engram_optimizers(model, lr=3e-3)
    tables_before = {lid: t.detach().clone() for lid, t in adapter.tables().items()}
    batches = _batches(tok, texts)
    with torch.no_grad():
        first = model(batches[0], labels=batches[0]).loss.item()
    touched: set[int] = set()
    for x in batches:
        out = model(x, labels=x)
        out.loss.backward()
        touched.update(next(iter(opt.sparse.step_rows().values())).tolist())
        opt.step()
        sched.step()
        opt.zero_grad()
    assert all(t.grad is None for t in adapter.tables().values())  # never a dense table gradient
    with torch.no_grad():
        last = model(batches[0], labels=batches[0]).loss.item()
    assert last < first - 0.3, (first, last)
    table = adapter.tables()[1].detach()
    changed = (table != tables_before[1]).any(dim=1).nonzero().flatten().tolist()
    # Sparse: only rows the batches used moved (rows seen only at step 1, while the value path was still zero,
    # had a zero gradient and stayed put).
    assert changed and set(changed) <= touched and len(touched) < table.shape[0]
    # The value path, zero at insertion, has learned.
    assert any(blk.wkv.weight[32:].abs().sum() > 0 for blk in adapter.blocks.values())


def test_hf_trainer_with_frozen_base_lowers_loss_and_touches_only_engram(tok, texts: list[str], tmp_path: Path) -> None:
    model = _model("llama", len(tok)).train()
    add_engram(model, tok, layers=[1], seed=0)
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("engram_adapter")}
    opt, sched = engram_optimizers(model, lr=1e-2, freeze_base=True)
    batches = _batches(tok, texts, batch=2)
    data = [{"input_ids": r, "labels": r} for b in batches for r in b]
    with torch.no_grad():
        first = model(batches[0], labels=batches[0]).loss.item()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=20,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=5,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    model.eval()
    with torch.no_grad():
        last = model(batches[0], labels=batches[0]).loss.item()
    assert last < first - 0.05, (first, last)
    for k, v in model.state_dict().items():
        if not k.startswith("engram_adapter"):
            assert torch.equal(v, base_before[k]), k
    assert opt.sparse.state[1].n > 0  # the tables were stepped by the sparse optimiser


def test_save_load_round_trip_and_refusals(tok, texts: list[str], tmp_path: Path) -> None:
    model = _model("qwen2", len(tok))
    adapter = add_engram(model, tok, layers=[1, 2], seed=0, head_dim=16)
    _randomise(adapter)
    ids = torch.tensor([tok.encode(texts[0][:300])])
    with torch.no_grad():
        want = model(ids).logits
    out = save_engram(model, tmp_path / "eng")
    doc = json.loads((out / ADAPTER_CONFIG).read_text())
    assert doc["hash_fingerprint"] == adapter.fingerprint and doc["engram"]["head_dim"] == 16
    files = sorted(p.name for p in out.iterdir())
    assert files == ["engram_adapter.json", "engram_adapter.safetensors", "engram_hash.safetensors"]

    fresh = _model("qwen2", len(tok))  # same base weights (same seed)
    loaded = load_engram(fresh, tok, out)
    assert loaded.fingerprint == adapter.fingerprint
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)

    other_tok = _hf_tokenizer(texts[:2], 400)
    with pytest.raises(ForeignTokenizerError, match="compression map"):
        load_engram(_model("qwen2", len(other_tok)), other_tok, out)
    wide = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ConfigError, match="hidden_size"):
        load_engram(wide, tok, out)
    differs = _model("qwen2", len(tok))
    add_engram(differs, tok, layers=[1, 2], head_dim=16, seed=0, engram_vocab_size=[1009, 1013])
    with pytest.raises(HashSpecMismatch):
        load_engram(differs, tok, out)


def test_bad_arguments_are_one_clear_error(tok) -> None:
    model = _model("llama", len(tok))
    with pytest.raises(ConfigError, match="layers"):
        add_engram(model, tok, layers=[7])
    with pytest.raises(ConfigError, match="not an Engram geometry field"):
        add_engram(_model("llama", len(tok)), tok, layers=[1], heads=3)
    with pytest.raises(ConfigError, match="preset"):
        add_engram(_model("llama", len(tok)), tok, layers=[1], preset="nope")
    small = _model("llama", 100)
    with pytest.raises(ForeignTokenizerError, match="embedding"):
        add_engram(small, tok, layers=[1])
    ok = _model("llama", len(tok))
    add_engram(ok, tok, layers=[1], preset="tiny", engram_vocab_size=[997, 1009])
    assert ok.engram_adapter.config.head_dim == 32 and ok.engram_adapter.layout.spec.n_head_per_ngram == 4
    with pytest.raises(ConfigError, match="already has Engram"):
        add_engram(ok, tok, layers=[1])
    with pytest.raises(ConfigError, match="input_ids"):
        ok(inputs_embeds=torch.zeros(1, 3, 32))


def test_readme_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, as written, on a prepared corpus standing in for runs/data/sotu."""
    import re

    from engramlm.data import prepare

    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "add_engram(" in b
    ]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    prepare("stdlib", tmp_path / "runs/data/sotu", 400, max_bytes=40_000, progress=False, log=lambda s: None)
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    trained = ns["model"].engram_adapter
    assert ns["opt"].sparse.state[1].n > 0  # the tables were stepped sparsely
    again = transformers.LlamaForCausalLM(ns["config"])
    loaded = load_engram(again, ns["tok"], tmp_path / "runs/llama_engram")
    for k, v in trained.blocks.state_dict().items():
        assert torch.equal(loaded.blocks.state_dict()[k], v), k


def test_gradient_checkpointing_gives_the_same_gradients(tok, texts: list[str]) -> None:
    """HF recomputes a checkpointed layer through its ``__call__``: the Engram pre-hook runs again, same rows."""

    def grads(checkpointing: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        model = _model("llama", len(tok)).train()
        _randomise(add_engram(model, tok, layers=[1], seed=0))
        if checkpointing:
            model.gradient_checkpointing_enable()
        opt, _ = engram_optimizers(model, lr=1e-3)
        ids = torch.tensor([tok.encode(texts[0][:400])])
        model(ids, labels=ids, use_cache=False).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], opt.sparse._pending[0].leaf.grad

    dense, rows = grads(False)
    dense_gc, rows_gc = grads(True)
    assert len(dense) == len(dense_gc) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(dense, dense_gc, strict=True))
    assert torch.allclose(rows, rows_gc, atol=1e-6) and rows.abs().sum() > 0


def test_left_padded_batched_generate_equals_each_prompt_alone(tok, texts: list[str]) -> None:
    model = _model("llama", len(tok), seed=2)
    _randomise(add_engram(model, tok, layers=[1], seed=0))
    prompts = [texts[0][:160], texts[1][:60]]
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
        assert (enc.attention_mask == 0).any()  # the short prompt is left-padded
        batch = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for i, p in enumerate(prompts):
            alone = model.generate(**tok([p], return_tensors="pt"), max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert batch[i, -8:].tolist() == alone[0, -8:].tolist()
    finally:
        tok.padding_side = "right"
