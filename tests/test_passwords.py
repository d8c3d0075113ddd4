"""Password schemes: round trips, mismatches, and corrupt stored values that must fail closed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.auth.passwords import (
    DUMMY_HASH,
    HASH_SCHEMES,
    hash_password,
    plaintext_secret,
    scheme_of,
    verify_password,
)


def test_argon2id_round_trip() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(stored, b"correct horse")
    assert not verify_password(stored, b"correct horsE")
    assert not verify_password(stored, b"")


def test_argon2i_round_trip_and_scheme_label_must_match() -> None:
    stored = hash_password("s3cret", "argon2i")
    assert stored.startswith("{ARGON2I}$argon2i$")
    assert verify_password(stored, b"s3cret")
    # The same encoded hash under a lying label is refused.
    relabelled = "{ARGON2ID}" + stored[len("{ARGON2I}") :]
    assert not verify_password(relabelled, b"s3cret")


def test_non_ascii_password() -> None:
    stored = hash_password("pässwörd")
    assert verify_password(stored, "pässwörd".encode())
    assert not verify_password(stored, "pässwörd".encode("latin-1"))


def test_plain_and_clear() -> None:
    assert verify_password("{PLAIN}hunter2", b"hunter2")
    assert verify_password("{clear}hunter2", b"hunter2")
    assert not verify_password("{PLAIN}hunter2", b"hunter3")
    assert hash_password("x y", "PLAIN") == "{PLAIN}x y"
    assert plaintext_secret("{CLEAR}abc") == b"abc"
    assert plaintext_secret(hash_password("abc", "PLAIN")) == b"abc"


def test_plaintext_secret_is_none_for_one_way_hashes() -> None:
    assert plaintext_secret(DUMMY_HASH) is None
    assert plaintext_secret("garbage") is None


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "hunter2",
        "{}hunter2",
        "{NOSUCH}hunter2",
        "{ARGON2ID}",
        "{ARGON2ID}$argon2id$garbage",
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$!!!$!!!",
        "{ARGON2ID}hunter2",
        "{SHA512-CRYPT}$6$abc$def",
        "{ARGON2ID",
    ],
)
def test_garbage_stored_value_is_false_not_an_exception(stored: str) -> None:
    assert verify_password(stored, b"hunter2") is False


def test_dummy_hash_is_a_well_formed_argon2id_hash_that_matches_nothing_simple() -> None:
    assert scheme_of(DUMMY_HASH) == "ARGON2ID"
    assert not verify_password(DUMMY_HASH, b"")
    assert not verify_password(DUMMY_HASH, b"password")


def test_unknown_scheme_cannot_be_hashed() -> None:
    with pytest.raises(ValueError):
        hash_password("x", "MD5-CRYPT")
    with pytest.raises(ValueError):
        hash_password("a\nb", "PLAIN")


@settings(max_examples=200)
@given(st.text(max_size=300), st.binary(max_size=64))
def test_verify_never_raises(stored: str, password: bytes) -> None:
    assert verify_password(stored, password) in (True, False)


@settings(max_examples=50)
@given(
    st.text(
        # Only text a user can type: encodable as UTF-8 (no lone surrogates), no line breaks.
        alphabet=st.characters(codec="utf-8", blacklist_characters="\r\n\x00"),
        max_size=40,
    )
)
def test_plain_round_trip_property(password: str) -> None:
    assert verify_password(hash_password(password, "PLAIN"), password.encode("utf-8"))


def test_lone_surrogate_is_a_value_error_for_every_scheme() -> None:
    """Such a str cannot be encoded (seen from Hypothesis); refuse it rather than crash."""
    for scheme in HASH_SCHEMES:
        with pytest.raises(ValueError, match="surrogate"):
            hash_password("ab\udc80", scheme)
