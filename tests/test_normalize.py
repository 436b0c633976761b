"""GF-1 and the edge cases of the spec §3.2 normaliser."""

import pytest
from tokenizers import normalizers

from engramlm.hashing.normalize import NORMALIZER_ID, WHITE_SPACE, normalize

GF1 = [
    (" Apple", "apple"),
    ("APPLE", "apple"),
    ("apple", "apple"),
    ("é", "e"),
    ("ﬁ", "fi"),
    ("Ⅻ", "xii"),
    ("Ǆ", "dz"),
    ("①", "1"),
    ("İ", "i"),
    ("\t\n ", " "),
    ("\n\n", " "),
    ("  ", " "),
    ("\u00a0", " "),
    ("x\t\ty", "x y"),
    ("  a  b ", "a b"),
    ("\u3000x", "x"),
    ("ß", "ß"),
    ("\u2028", ""),
    ("\u0301", ""),
]


@pytest.mark.parametrize(("text", "expected"), GF1)
def test_gf1_examples(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_private_use_sentinel_in_input_becomes_space() -> None:
    assert normalize("\ue000") == " "
    assert normalize("a\ue000b") == "a b"


def test_information_separators_are_not_stripped() -> None:
    # str.strip() would remove U+001C..U+001F; Unicode White_Space does not include them.
    assert normalize("\x1c") == "\x1c"
    assert normalize("\x1fx\x1c") == "\x1fx\x1c"
    assert not set("\x1c\x1d\x1e\x1f") & set(WHITE_SPACE)


def test_only_ascii_whitespace_runs_collapse() -> None:
    assert normalize("a\x85\x85b") == "a\x85\x85b"  # NEL: White_Space, but not collapsed
    assert normalize("\x85a\x85") == "a"  # ... yet stripped at the ends


def test_all_marks_are_stripped_not_only_mn() -> None:
    assert normalize("\u0995\u09be") == "\u0995"  # Bengali KA + AA sign (Mc)
    assert normalize("a\u20dd") == "a"  # enclosing circle (Me)


def test_matches_hf_reference_on_tricky_strings(hf_reference: normalizers.Normalizer) -> None:
    ref = hf_reference
    extra = ["\u0995\u09be", "a\u20dd", "ΣΑ", "Σ", "\x1c \x1c", " \ue000 ", "\r\n\r\n", "\u200b"]
    for text, _ in GF1:
        assert normalize(text) == ref.normalize_str(text), repr(text)
    for text in extra:
        assert normalize(text) == ref.normalize_str(text), repr(text)


def test_final_sigma_follows_str_lower_not_hf(hf_reference: normalizers.Normalizer) -> None:
    # Known divergence: step 4 is Python str.lower, which applies the final-sigma rule; HF
    # Lowercase maps each char alone. No id of either DeepSeek fixture is affected.
    assert normalize("ΣΑΣ") == "σας"
    assert hf_reference.normalize_str("ΣΑΣ") == "σασ"


def test_normalizer_id() -> None:
    assert NORMALIZER_ID == "engramlm.norm/1"
