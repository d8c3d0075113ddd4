"""The shared SASL mechanisms: CRAM-MD5 (RFC 2195), challenges, digest answers."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate import sasl
from mailgate.interfaces import IDigestResponse

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_RESPONSE = base64.b64decode(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")


def test_cram_md5_rfc2195_exchange_yields_digest_credentials() -> None:
    mech = sasl.mechanism("cram-md5", challenge=RFC2195_CHALLENGE)
    assert isinstance(mech, sasl.CramMD5)
    assert not mech.plaintext and mech.server_first
    first = mech.start(None)
    assert first == sasl.Challenge(RFC2195_CHALLENGE)
    creds = mech.step(RFC2195_RESPONSE)
    assert isinstance(creds, sasl.DigestResponse)
    assert IDigestResponse.providedBy(creds)
    assert creds == sasl.DigestResponse(
        b"tim", RFC2195_CHALLENGE, b"b913a602c7eda7a495b4e6e7334d3890", "CRAM-MD5"
    )


def test_cram_md5_refuses_an_initial_response() -> None:
    mech = sasl.mechanism("CRAM-MD5", challenge=RFC2195_CHALLENGE)
    assert mech is not None
    with pytest.raises(sasl.SaslError):
        mech.start(b"tim 0123")


@pytest.mark.parametrize(
    "answer",
    [
        b"tim",
        b"tim b913a602c7eda7a495b4e6e7334d389",  # 31 hex digits
        b"tim b913a602c7eda7a495b4e6e7334d3890ff",
        b"tim g913a602c7eda7a495b4e6e7334d3890",
        b" b913a602c7eda7a495b4e6e7334d3890",
        b"\xff\xfe b913a602c7eda7a495b4e6e7334d3890",
    ],
)
def test_malformed_cram_md5_answers_fail(answer: bytes) -> None:
    mech = sasl.mechanism("CRAM-MD5", challenge=RFC2195_CHALLENGE)
    assert mech is not None
    mech.start(None)
    with pytest.raises(sasl.SaslError):
        mech.step(answer)


def test_digest_answer_is_lower_cased_hex() -> None:
    user, digest = sasl.parse_digest_answer(b"tim B913A602C7EDA7A495B4E6E7334D3890")
    assert (user, digest) == (b"tim", b"b913a602c7eda7a495b4e6e7334d3890")


def test_make_challenge_is_msg_id_shaped_and_unique() -> None:
    seen = {sasl.make_challenge("mail.example.com", 1700000000.5) for _ in range(200)}
    assert len(seen) == 200
    for challenge in seen:
        assert re.fullmatch(rb"<[0-9a-f]{16}\.1700000000@mail\.example\.com>", challenge)


def test_make_challenge_never_carries_odd_hostname_characters() -> None:
    challenge = sasl.make_challenge("bad host<>@\r\n", 1)
    assert re.fullmatch(rb"<[0-9a-f]{16}\.1@badhost>", challenge)


@given(st.binary(max_size=80))
def test_cram_md5_step_never_raises_anything_but_sasl_error(data: bytes) -> None:
    mech = sasl.CramMD5(RFC2195_CHALLENGE)
    mech.start(None)
    try:
        result = mech.step(data)
    except sasl.SaslError:
        return
    assert isinstance(result, sasl.DigestResponse)
    assert len(result.response) == 32
