"""The tokenizer-compression normaliser Norm (spec §3.2), in pure Python.

Pure Python (``unicodedata``) rather than the HF normaliser objects, so that the keys, and thus
V' and every hash multiplier, do not depend on which ``tokenizers`` build is installed. The
steps and their order are normative; changing anything here changes NORMALIZER_ID.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["NORMALIZER_ID", "WHITE_SPACE", "normalize"]

NORMALIZER_ID = "engramlm.norm/1"
"""Recorded in compression artefacts; bump it on any behavioural change."""

WHITE_SPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
"""Unicode White_Space (step 7). ``str.strip()`` would also strip U+001C..U+001F, which is wrong."""

_SENTINEL = "\ue000"
_WS_RUN = re.compile(r"[ \t\r\n]+")


def _strip_marks(s: str) -> str:
    """Step 3: drop every Mark (Mn, Mc, Me); Mn alone keeps e.g. Bengali vowel signs (V'=99,045)."""
    return "".join(c for c in s if unicodedata.category(c)[0] != "M")


def normalize(text: str) -> str:
    """Apply spec §3.2 steps 1-8 to one decoded token text.

    An empty result is meaningful: the caller (compression) then falls back to the raw text.
    Step 4 is ``str.lower``, which applies the final-sigma rule ("ΣΑΣ" -> "σας") where HF
    ``Lowercase`` maps chars one by one ("σασ"); no id of either DeepSeek fixture is affected.
    """
    if text.isascii():
        # NFKC, NFD and mark stripping are identities on ASCII: skip them (most of the vocab).
        s = text.lower()
    else:
        s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
        s = _strip_marks(s).lower()
    s = _WS_RUN.sub(" ", s)
    if s == " ":
        s = _SENTINEL
    s = s.strip(WHITE_SPACE)
    return s.replace(_SENTINEL, " ")
