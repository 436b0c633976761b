"""engramlm models as HF transformers models: ``engramlm export-hf``, ``AutoModelForCausalLM``, ``generate()``.

One exported model (a project BPE trained on the docs, random ShortConv weights so a wrong conv state
shows) serves every test: same logits as engramlm, greedy ``generate()`` equal to ``engramlm generate``,
fingerprints checked on load, the tokenizer round trip, and the tables served from a store.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engramlm.cli.main import main
from engramlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer, save_tokenizer, train_tokenizer
from engramlm.errors import ConfigError, CorruptModelFileError, HashSpecMismatch
from engramlm.hashing.compression import CompressionMap
from engramlm.hashing.spec import HashSpec, make_layout
from engramlm.hf.modeling import EngramCache, EngramConfig, EngramForCausalLM
from engramlm.models.config import EngramConfig as EngramSection
from engramlm.models.config import ModelConfig
from engramlm.models.io import load_pretrained, save_pretrained, write_checksums
from engramlm.models.locate import verify_tokenizer
from engramlm.models.model import EngramLM
from helpers import randomise_conv

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("The hashed n-gram tables", "def read_config(path):")
PADDED = ("The hashed n-gram tables of every Engram layer, read a row at a time", "x = 1")  # surely unequal lengths
NEW = 8

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cmap: CompressionMap, primes: tuple[int, int] = (257, 263)) -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=primes, layer_ids=(1,), pad_id=PAD_ID)
    cfg = ModelConfig(
        vocab_size=cmap.vocab_size,
        hidden_size=32,
        num_layers=2,
        n_heads=2,
        mlp_hidden=48,
        hc_mult=2,
        engram=EngramSection(hash=spec, head_dim=8, conv_zero_init=False),
    )
    torch.manual_seed(0)
    model = EngramLM(cfg, make_layout(spec, cmap))
    randomise_conv(model)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """run/model (save_pretrained) + run/tokenizer.json -> `export-hf` -> out; `store build out` -> store."""
    root = tmp_path_factory.mktemp("hf")
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    (root / "run").mkdir()
    save_tokenizer(train_tokenizer(texts, vocab_size=400), root / "run" / "tokenizer.json")
    save_pretrained(_model(CompressionMap.from_tokenizer(root / "run" / "tokenizer.json")), root / "run" / "model")
    assert main(["export-hf", str(root / "run" / "model"), str(root / "out")]) == 0
    assert main(["store", "build", str(root / "out"), "--out", str(root / "store"), "--no-progress"]) == 0
    return {"root": root, "model": root / "run" / "model", "tok": root / "run" / "tokenizer.json",
            "out": root / "out", "store": root / "store"}  # fmt: skip


@pytest.fixture(scope="module")
def hf(exported: dict[str, Path]) -> EngramForCausalLM:
    return AutoModelForCausalLM.from_pretrained(exported["out"])


@pytest.fixture(scope="module")
def tok(exported: dict[str, Path]):
    return AutoTokenizer.from_pretrained(exported["out"])


def _engramlm_generate(capsys: pytest.CaptureFixture[str], model: Path, prompt: str, *extra: str) -> list[int]:
    assert main(["generate", str(model), "--json", "--max-new-tokens", str(NEW), "--prompt", prompt, *extra]) == 0
    return json.loads(capsys.readouterr().out)["outputs"][0]["tokens"]


def _new_tokens(row: torch.Tensor) -> list[int]:
    """HF's continuation as engramlm reports it: up to (not including) the first EOS."""
    ids = row.tolist()
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


# ------------------------------------------------------------------------------------ export and logits


def test_export_loads_with_the_auto_classes_and_gives_engramlm_logits(exported, hf, tok) -> None:
    config = AutoConfig.from_pretrained(exported["out"])
    assert isinstance(config, EngramConfig) and isinstance(hf, EngramForCausalLM)
    ref = load_pretrained(exported["model"]).eval()
    assert config.hash_fingerprint == ref.layout.fingerprint
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (ref.config.vocab_size, 2, 32)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    # the weights travel byte for byte (a store built from the run matches the export)
    for name in ("model.safetensors", "engram_hash.safetensors"):
        assert (exported["out"] / name).read_bytes() == (exported["model"] / name).read_bytes()
    ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf(ids, labels=ids)
        want = ref(ids).logits
    assert torch.equal(out.logits, want)
    assert out.cache is None  # a plain forward keeps no decode state unless asked (use_cache=True)
    with torch.no_grad():
        shifted = ref(ids[:, :-1], targets=ids[:, 1:]).loss
    torch.testing.assert_close(out.loss, shifted)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_each_sequence_alone(hf, tok, side: str) -> None:
    tok.padding_side = side
    try:
        batch = tok(list(PADDED), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    mask = batch.attention_mask.bool()
    assert not bool(mask.all())  # one row is padded
    with torch.no_grad():
        logits = hf(**batch).logits
        for i, prompt in enumerate(PADDED):
            alone = hf(tok(prompt, return_tensors="pt").input_ids).logits[0]
            torch.testing.assert_close(logits[i][mask[i]], alone, rtol=1e-5, atol=1e-5)
            assert bool((logits[i][~mask[i]] == 0).all())
        # the loss counts only targets predicted from real positions: each row's own next-token loss
        loss = hf(**batch, labels=batch.input_ids).loss
        per_row = []
        for prompt in PADDED:
            ids = tok(prompt, return_tensors="pt").input_ids
            per_row.append((hf(ids, labels=ids).loss, ids.shape[1] - 1))
    total = sum(x * k for x, k in per_row) / sum(k for _, k in per_row)
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-5)


def test_refused_inputs_name_what_is_wrong(hf, tok) -> None:
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    holes = torch.ones_like(ids)
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="one run"):
        hf(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(1, 3, 32))
    tok.padding_side = "right"
    right = tok(list(PADDED), return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="left padding"):
        hf.generate(**right, max_new_tokens=2, do_sample=False)
    with pytest.raises(NotImplementedError, match="beam search"):
        hf.generate(ids, max_new_tokens=2, num_beams=2, do_sample=False)


def test_save_pretrained_round_trip_and_dtype(hf, tok, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path / "saved")  # engramlm's layout: checksummed, fingerprinted, HF config merged
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert load_pretrained(tmp_path / "saved").layout.fingerprint == again.config.hash_fingerprint
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
        half = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
        assert half(ids).logits.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ generation


def test_greedy_generate_equals_engramlm_generate(
    exported: dict[str, Path], hf, tok, capsys: pytest.CaptureFixture[str]
) -> None:
    for prompt in PROMPTS:
        want = _engramlm_generate(capsys, exported["model"], prompt)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=NEW, do_sample=False)
        assert _new_tokens(out[0, ids.shape[1] :]) == want and len(want) > 0
        # the export is itself an engramlm saved model: `engramlm generate OUT` reads its tokenizer (no double BOS)
        assert _engramlm_generate(capsys, exported["out"], prompt) == want


def test_left_padded_batch_generate_equals_one_by_one(hf, tok) -> None:
    alone = []
    for prompt in PADDED:
        ids = tok(prompt, return_tensors="pt").input_ids
        alone.append(hf.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1] :])
    tok.padding_side = "left"
    try:
        batch = tok(list(PADDED), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    out = hf.generate(**batch, max_new_tokens=NEW, do_sample=False)[:, batch.input_ids.shape[1] :]
    for i in range(len(PADDED)):
        assert _new_tokens(out[i]) == _new_tokens(alone[i])


def test_cache_holds_the_ngram_history_and_grows(hf, tok) -> None:
    """Prefill + one-token steps through an EngramCache made too small give the full forward's logits."""
    ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    split = ids.shape[1] - 4
    cache = EngramCache(max_len=split)
    with torch.no_grad():
        full = hf(ids).logits
        steps = [hf(ids[:, :split], cache=cache).logits]
        for i in range(split, ids.shape[1]):
            steps.append(hf(ids[:, i : i + 1], cache=cache).logits)
    assert cache.get_seq_length() == ids.shape[1] and cache.max_len >= ids.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # the streaming hasher holds the last N-1 compressed ids, the conv state the last (w-1)*dilation values
    assert cache.decode is not None and cache.decode.stream is not None and cache.decode.conv


def test_generate_continues_a_user_cache(hf, tok) -> None:
    """A second generate() on the same EngramCache feeds only the new columns (a multi-token cached chunk)."""
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    cache = EngramCache()
    first = hf.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)
    more = torch.cat([first, tok(" and more", add_special_tokens=False, return_tensors="pt").input_ids], dim=1)
    again = hf.generate(more, cache=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(again, hf.generate(more, max_new_tokens=4, do_sample=False))
    assert cache.get_seq_length() == again.shape[1] - 1  # the last token is sampled, not yet fed


# ------------------------------------------------------------------------------------ checks on load


def _copy(exported: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(exported["out"], dst)
    return dst


def test_fingerprint_mismatch_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    # config.json claims another fingerprint (digests rewritten, so only the fingerprint check can catch it)
    bad = _copy(exported, tmp_path)
    doc = json.loads((bad / "config.json").read_text())
    doc["hash_fingerprint"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(doc))
    write_checksums(bad)
    with pytest.raises(HashSpecMismatch, match="fingerprint"):
        AutoModelForCausalLM.from_pretrained(bad)
    # the hash artefact of a model with other primes in place of this one's
    other = tmp_path / "other"
    save_pretrained(_model(CompressionMap.from_tokenizer(exported["tok"]), primes=(269, 271)), other)
    swapped = tmp_path / "swapped"
    shutil.copytree(exported["out"], swapped)
    shutil.copyfile(other / "engram_hash.safetensors", swapped / "engram_hash.safetensors")
    write_checksums(swapped)
    with pytest.raises(HashSpecMismatch):
        AutoModelForCausalLM.from_pretrained(swapped)
    # an EngramConfig of another model handed in
    config = AutoConfig.from_pretrained(exported["out"])
    config.hash_fingerprint = load_pretrained(other).layout.fingerprint
    with pytest.raises(HashSpecMismatch, match="EngramConfig"):
        EngramForCausalLM.from_pretrained(exported["out"], config=config)


def test_a_damaged_export_is_refused_naming_the_file(exported: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(exported, tmp_path)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptModelFileError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(ConfigError, match="device_map"):
        AutoModelForCausalLM.from_pretrained(exported["out"], device_map="auto")


def test_autotokenizer_round_trip(exported: dict[str, Path], tok) -> None:
    project = load_tokenizer(exported["tok"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    for text in (*PROMPTS, "café, naïve: ünïcödé\n\tdone"):
        ids = tok(text).input_ids
        assert ids == [BOS_ID, *project.encode(text).ids]  # BOS first, as engramlm generate and the shards put it
        assert tok.decode(ids, skip_special_tokens=True) == text
    # the export's tokenizer.json is the one the tables were hashed with (same compression map)
    verify_tokenizer(load_pretrained(exported["model"]), exported["out"] / "tokenizer.json")


# ------------------------------------------------------------------------------------ tables in a store


@pytest.mark.parametrize("tier", ["mmap", "direct"])
def test_store_backed_model_equals_in_model(exported: dict[str, Path], hf, tok, tier: str) -> None:
    stored = AutoModelForCausalLM.from_pretrained(exported["out"], engram_store=exported["store"], engram_tier=tier)
    try:
        assert all(blk.embed.weight.numel() == 0 for blk in stored.engram.engram_layers.values())  # tables freed
        ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(stored(ids).logits, hf(ids).logits)
        for prompt in PROMPTS:
            p = tok(prompt, return_tensors="pt").input_ids
            want = hf.generate(p, max_new_tokens=NEW, do_sample=False)
            assert torch.equal(stored.generate(p, max_new_tokens=NEW, do_sample=False), want)
    finally:
        stored.close_store()


def test_store_of_another_model_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    save_pretrained(_model(CompressionMap.from_tokenizer(exported["tok"]), primes=(269, 271)), other)
    assert main(["store", "build", str(other), "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    with pytest.raises(HashSpecMismatch):
        EngramForCausalLM.from_pretrained(exported["out"], engram_store=tmp_path / "store")


# ------------------------------------------------------------------------------------ the README


def test_readme_python_snippet_runs(
    exported: dict[str, Path], hf, tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The README's "Hugging Face transformers" Python block, run against this export and its store."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Hugging Face transformers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README section has no python block"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart-hf").symlink_to(exported["out"])
    (tmp_path / "runs" / "quickstart-hf-store").symlink_to(exported["store"])
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    prompt = re.search(r'tok\("([^"]+)"', blocks[0]).group(1)
    ids = tok(prompt, return_tensors="pt").input_ids
    want = hf.generate(ids, max_new_tokens=scope["out"].shape[1] - ids.shape[1], do_sample=False)
    assert printed.strip() == tok.decode(want[0, ids.shape[1] :]).strip()
    if "stored" in scope:
        scope["stored"].close_store()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the device machine)")
def test_model_on_cuda_with_tables_in_host_memory(exported: dict[str, Path], hf, tok) -> None:
    """The dense model on the accelerator, the Engram rows from host RAM through the prefetcher: same tokens."""
    gpu = AutoModelForCausalLM.from_pretrained(
        exported["out"], device_map="cuda", engram_store=exported["store"], engram_tier="memory"
    )
    try:
        assert next(gpu.engram.parameters()).device.type == "cuda"
        tok.padding_side = "left"
        try:
            batch = tok(list(PADDED), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = "right"
        want = hf.generate(**batch, max_new_tokens=NEW, do_sample=False)
        got = gpu.generate(**{k: v.cuda() for k, v in batch.items()}, max_new_tokens=NEW, do_sample=False)
        assert torch.equal(got.cpu(), want)
    finally:
        gpu.close_store()
