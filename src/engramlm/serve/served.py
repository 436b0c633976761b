"""What a server serves: a trained model, its tokenizer and its tables (in the model or a store tier),
loaded the way ``engramlm generate`` loads them, so a served prompt gets the tokens ``generate`` gets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlm.errors import ConfigError
from engramlm.infer.engine import Engine
from engramlm.store.tiers import Tier

# The chat template of a base model (no chat template in its files): one "Role: content" paragraph per
# message, then "Assistant:" for the model to continue. Same text as PLAIN_CHAT_JINJA, which /tokenizer_info
# publishes for clients that render templates themselves.
PLAIN_CHAT_JINJA = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def render_plain_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """:data:`PLAIN_CHAT_JINJA` in Python (no template engine needed on the server)."""
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


@dataclass
class Served:
    """A loaded model ready to serve. ``bos`` is prepended to text prompts (as ``generate`` does);
    ``eos`` ends a generation."""

    name: str
    engine: Engine
    tokenizer: Any  # tokenizers.Tokenizer
    bos: list[int]
    eos: tuple[int, ...]
    tier: str = "model"
    tables: dict[int, Any] = field(default_factory=dict)
    max_len: int = 0

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """``special``: as ``engramlm generate`` encodes a prompt (BOS first); else the bare text's ids."""
        if special:
            return self.bos + self.tokenizer.encode(text).ids
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def special(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def close(self) -> None:
        self.engine.close()
        for t in self.tables.values():
            t.close()


def load_served(
    checkpoint: str | os.PathLike[str],
    *,
    name: str | None = None,
    tokenizer: str | None = None,
    store: str | os.PathLike[str] | None = None,
    tier: Tier | str = Tier.MMAP,
    cache_bytes: int = 0,
    verify_store: bool = True,
    mooncake: Any = None,
    mooncake_reader: Any = None,
    device: str = "cpu",
    workers: int | None = None,
) -> Served:
    """Load ``checkpoint`` (saved model, training checkpoint or run dir) with the tokenizer it was trained
    with; with ``store`` the Engram rows come from that store directory on ``tier``."""
    from engramlm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
    from engramlm.infer.tables import drop_model_tables, open_tables
    from engramlm.models.locate import find_tokenizer, load_trained_model, read_tokenizer

    trained = load_trained_model(checkpoint, map_location=device)
    model = trained.model
    tok = read_tokenizer(find_tokenizer(trained.files, model, explicit=tokenizer))
    if [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [BOS_ID, EOS_ID, PAD_ID]:  # the project layout
        bos, eos = [BOS_ID], (EOS_ID,)
    else:  # e.g. a DeepSeek tokenizer: no BOS/EOS convention
        bos, eos = [], ()
    tables: dict[int, Any] = {}
    tier_name = "model"
    if store is not None:
        if model.layout is None:
            raise ConfigError("--store: the model has no Engram layers")
        tables = open_tables(
            store,
            tier,
            cache_bytes=cache_bytes,
            fingerprint=model.layout.fingerprint,
            mooncake=mooncake,
            mooncake_reader=mooncake_reader,
            model_sha256=trained.files.weights_sha256(),
            verify=verify_store,
        )
        drop_model_tables(model)
        tier_name = Tier.parse(tier).value
    vocab = min(tok.get_vocab_size(with_added_tokens=True), model.config.vocab_size)
    engine = Engine(model, tables or None, workers=workers, pad_id=bos[0] if bos else 0, vocab_size=vocab)
    given = Path(checkpoint)
    return Served(
        name=name or given.resolve().name,
        engine=engine,
        tokenizer=tok,
        bos=bos,
        eos=eos,
        tier=tier_name,
        tables=tables,
        max_len=model.config.max_seq_len,
    )
