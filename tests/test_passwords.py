"""Password schemes: round trips, mismatches, and corrupt stored values that must fail closed."""

from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import string
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.auth.passwords import (
    _MD5_INIT,
    DUMMY_HASH,
    HASH_SCHEMES,
    SHA_CRYPT_MAX_ROUNDS,
    UnknownScheme,
    _md5_compress,
    _md5_finish,
    apop_digest,
    check_stored,
    cram_md5_digest,
    hash_password,
    hmac_md5_context,
    is_known_scheme,
    normalize_stored,
    plaintext_secret,
    scheme_of,
    sha_crypt,
    supports_apop,
    supports_cram_md5,
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


# -- Dovecot schemes: vectors, interoperability, APOP/CRAM-MD5 ------------------------------

# Every vector below was made by Dovecot 2.3 (``doveadm pw -s SCHEME -p hunter2``) unless it
# says otherwise, and verified by it (``doveadm pw -t``).
DOVECOT_VECTORS = [
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$iQpk4sEXwBr32Th5Y4ILbg$"
    "dJ1BSAbJxwKcRINr1g14DyNJplM1ZL1kLKA+mDSyNtk",
    "{BLF-CRYPT}$2y$05$Z.QpSjRyNifGrDKM2eJFj.CJjtpnA6lz0U2KWfE86VcrP.cCZPgu2",
    "{SHA512-CRYPT}$6$Efnugk22OzyPx/kl$B6fH4yvhH5FuTo7R7cOHWmXYfgbmqku21A6cD6eOwR6Ix/AyfybdqCCUN"
    "/wGX8rg1rfAYGpE0UQZBDJves1yo0",
    "{SHA512-CRYPT}$6$rounds=10000$OWafqP1bjm55M4hK$I91FEAYK6VcVMIZOCEZtMFYb8VnOGOMHRc9Xu5ag10tx"
    "28rU2vWbkh3VFNcUBmlnabmCk2cGv9c2llfp2A6Ln/",
    "{SHA256-CRYPT}$5$AjJlv4P8vzeRr2DD$FmqAhUlnu23Q1vFiTRGooWVeFaJv1Jz2Js.5qEslECD",
    "{CRYPT}$2y$05$xBBazLFOBEz9EX0WLrODS.z76fuKb2Yyut6Z/AHOCfZWbKUYRDeOy",
    "{SSHA512}zmsjuc6prBsOp6hsi9dY/fjbclL6EGl6cpirB0zRKW1KRW0iqaFk5vQUFS8yQCg8aclqRuaAV4LgcAU3vEf"
    "9NxGq+7k=",
    "{SSHA512.HEX}cac5cebab569c363976fbfa5bf2ea683d53572e8752781b982bc3c95904ec7f59bfa6f6ce79e7728"
    "0f7ffa761f953d05de26f0ad92c17add7c2aad8373a4d0467b98cf44",
    "{SSHA256}AuQiLFfbWEz9gwLFbnsoxjLOFL5Udhn2HIY/m55tZFn7V7E0",
    "{SHA512}a5ftaNFOs/GqlZzl1Jx9xhLh6x2v1zsecFhHSD/WpsgJ8s606N9v+ZhMYpj/AoXKzmYUv42qnwBwEBtsiYmeIg==",
    "{SHA512.HEX}6b97ed68d14eb3f1aa959ce5d49c7dc612e1eb1dafd73b1e705847483fd6a6c809f2ceb4e8df6ff998"
    "4c6298ff0285cace6614bf8daa9f0070101b6c89899e22",
    "{SHA256}9S+9MrKzuG/4jvbEkGKChfSCrxXdyylUH5S89Saj9sc=",
    "{SHA256.B64}9S+9MrKzuG/4jvbEkGKChfSCrxXdyylUH5S89Saj9sc=",
    "{CRAM-MD5}60ebd8347e945af7703b0d59d8bfedc236234196f561c057cf5a5d5a6e58304a",
    "{CRAM-MD5.B64}YOvYNH6UWvdwOw1Z2L/twjYjQZb1YcBXz1pdWm5YMEo=",
    "{HMAC-MD5}60ebd8347e945af7703b0d59d8bfedc236234196f561c057cf5a5d5a6e58304a",
    "{PLAIN}hunter2",
    "{CLEAR}hunter2",
    "{CLEARTEXT}hunter2",
    "{PLAIN.B64}aHVudGVyMg==",
]


@pytest.mark.parametrize("stored", DOVECOT_VECTORS)
def test_dovecot_vectors_verify(stored: str) -> None:
    assert verify_password(stored, b"hunter2") is True
    assert verify_password(stored, b"hunter3") is False
    assert verify_password(stored, b"") is False
    assert verify_password(stored, b"hunter2\x00") is False


# Ulrich Drepper's "Unix crypt using SHA-256 and SHA-512" test vectors (setting, key, result),
# also what ``openssl passwd -5/-6 -salt`` prints.
SHA_CRYPT_SPEC = [
    ("$5$saltstring", "Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    (
        "$5$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA",
    ),
    (
        "$5$rounds=5000$toolongsaltstring",
        "This is just a test",
        "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5",
    ),
    (
        "$5$rounds=10$roundstoolow",
        "the minimum number is still observed",
        "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC",
    ),
    (
        "$6$saltstring",
        "Hello world!",
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoE"
        "OfaS35inz1",
    ),
    (
        "$6$rounds=10000$saltstringsaltstring",
        "Hello world!",
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vO"
        "uZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "$6$rounds=1400$anotherlongsaltstring",
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9"
        "t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
]


@pytest.mark.parametrize(("setting", "key", "expected"), SHA_CRYPT_SPEC)
def test_sha_crypt_spec_vectors(setting: str, key: str, expected: str) -> None:
    assert sha_crypt(key.encode(), setting) == expected
    scheme = "{SHA512-CRYPT}" if expected.startswith("$6$") else "{SHA256-CRYPT}"
    assert verify_password(scheme + expected, key.encode())
    assert verify_password(expected, key.encode())  # unprefixed: Dovecot's default CRYPT
    assert not verify_password(scheme + expected, key.encode() + b" ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@settings(max_examples=15, deadline=None)
@given(
    variant=st.sampled_from(["-5", "-6"]),
    salt=st.text(alphabet=string.ascii_letters + string.digits + "./", min_size=1, max_size=16),
    # openssl reads an empty line as "no password", so at least one character.
    password=st.text(alphabet=string.printable.strip(), min_size=1, max_size=80),
)
def test_sha_crypt_matches_openssl(variant: str, salt: str, password: str) -> None:
    out = (
        subprocess.run(
            ["openssl", "passwd", variant, "-salt", salt, "-stdin"],
            input=password.encode() + b"\n",
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    assert sha_crypt(password.encode(), f"${variant[1]}${salt}") == out


def test_too_many_sha_crypt_rounds_fail_instead_of_spinning() -> None:
    stored = "{SHA512-CRYPT}$6$rounds=999999999$salt$" + "x" * 86
    assert verify_password(stored, b"hunter2") is False
    with pytest.raises(ValueError):
        sha_crypt(b"x", f"$6$rounds={SHA_CRYPT_MAX_ROUNDS + 1}$salt")


@pytest.mark.parametrize("scheme", HASH_SCHEMES)
def test_every_producible_scheme_round_trips(scheme: str) -> None:
    for password in ("hunter2", "pässwörd", "with:colon", " spaced "):
        stored = hash_password(password, scheme)
        assert scheme_of(stored) in (scheme, scheme + ".B64")
        assert verify_password(stored, password.encode())
        assert not verify_password(stored, password.encode() + b"!")
        assert normalize_stored(stored) == stored
        # Nothing a passwd-file line cannot hold.
        assert not any(c in stored for c in ":\r\n\x00")


def test_plain_with_colon_uses_dovecot_base64_form() -> None:
    stored = hash_password("a:b", "PLAIN")
    assert stored == "{PLAIN.B64}YTpi"
    assert plaintext_secret(stored) == b"a:b"


def test_bcrypt_limits() -> None:
    with pytest.raises(ValueError, match="72"):
        hash_password("x" * 73, "BLF-CRYPT")
    stored = hash_password("y" * 72, "blf-crypt")
    assert stored.startswith("{BLF-CRYPT}$2y$10$")
    assert verify_password(stored, b"y" * 72)
    # crypt_blowfish (and so Dovecot) only ever looks at 72 bytes; we agree with it.
    assert verify_password(stored, b"y" * 80)


@pytest.mark.skipif(shutil.which("doveadm") is None, reason="Dovecot's doveadm not installed")
@pytest.mark.parametrize("scheme", HASH_SCHEMES)
def test_dovecot_verifies_our_hashes(tmp_path: Path, scheme: str) -> None:
    conf = tmp_path / "dovecot.conf"
    conf.write_text("")
    stored = hash_password("pw: ünï", scheme)
    result = subprocess.run(
        ["doveadm", "-c", str(conf), "pw", "-t", stored, "-p", "pw: ünï"],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert b"(verified)" in result.stdout


@pytest.mark.skipif(shutil.which("doveadm") is None, reason="Dovecot's doveadm not installed")
@pytest.mark.parametrize(
    "scheme", ["BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "SSHA512", "CRAM-MD5"]
)
def test_we_verify_fresh_dovecot_hashes(tmp_path: Path, scheme: str) -> None:
    conf = tmp_path / "dovecot.conf"
    conf.write_text("")
    stored = (
        subprocess.run(
            ["doveadm", "-c", str(conf), "pw", "-s", scheme, "-p", "Grüße 123"],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    assert verify_password(stored, "Grüße 123".encode())
    assert not verify_password(stored, b"Gruesse 123")


# RFC 1939 section 7 and RFC 2195 section 2 examples.
APOP_TIMESTAMP = b"<1896.697170952@dbc.mtview.ca.us>"
CRAM_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"


def test_apop_rfc1939_vector() -> None:
    assert apop_digest("{PLAIN}tanstaaf", APOP_TIMESTAMP) == "c4c9334bac560ecc979e58001b3e22fb"
    assert apop_digest("{CLEAR}tanstaaf", APOP_TIMESTAMP) == "c4c9334bac560ecc979e58001b3e22fb"
    assert apop_digest("{PLAIN.B64}dGFuc3RhYWY=", APOP_TIMESTAMP) == (
        "c4c9334bac560ecc979e58001b3e22fb"
    )


def test_cram_md5_rfc2195_vector_from_plain_and_from_dovecot_context() -> None:
    expected = "b913a602c7eda7a495b4e6e7334d3890"
    assert cram_md5_digest("{PLAIN}tanstaaftanstaaf", CRAM_CHALLENGE) == expected
    # doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf
    context = "d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"
    assert hmac_md5_context(b"tanstaaftanstaaf").hex() == context
    assert cram_md5_digest("{CRAM-MD5}" + context, CRAM_CHALLENGE) == expected
    assert cram_md5_digest("{CRAM-MD5}" + context.upper(), CRAM_CHALLENGE) == expected


@pytest.mark.parametrize(
    ("secret", "context"),
    [  # doveadm pw -s CRAM-MD5: empty, non-ASCII, and a key longer than the 64-byte block
        ("", "00747cf2ffaf11c5ea4a64979c3901fc1d20dee13f480bb598f7d8575b23e61b"),
        ("pässwörd", "4a60bd37924fc5d45b4c92ce695bac86cb234bc3028aab2a71a225cb0dedfbb9"),
        ("k" * 100, "3ae21d35bcb420cc10d678a30813dfaff1c856d356b2c5f8429dc6087392415f"),
    ],
)
def test_cram_md5_contexts_match_dovecot(secret: str, context: str) -> None:
    assert hmac_md5_context(secret.encode()).hex() == context
    assert verify_password("{CRAM-MD5}" + context, secret.encode())


@settings(max_examples=100)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_md5_resumed_from_a_saved_state_is_md5(prefix_block: bytes, data: bytes) -> None:
    assert _md5_finish(_MD5_INIT, data, 0) == hashlib.md5(data).digest()
    block = (prefix_block * 64)[:64] if prefix_block else b"\0" * 64
    state = _md5_compress(_MD5_INIT, block)
    assert _md5_finish(state, data, 64) == hashlib.md5(block + data).digest()


@settings(max_examples=100)
@given(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=100),
    st.binary(max_size=100),
)
def test_cram_md5_digest_from_context_equals_hmac(password: str, challenge: bytes) -> None:
    expected = hmac.new(password.encode(), challenge, "md5").hexdigest()
    assert cram_md5_digest(hash_password(password, "CRAM-MD5"), challenge) == expected
    assert cram_md5_digest(hash_password(password, "PLAIN"), challenge) == expected


@pytest.mark.parametrize(
    ("stored", "apop", "cram"),
    [
        ("{PLAIN}x", True, True),
        ("{CLEAR}x", True, True),
        ("{PLAIN.B64}eA==", True, True),
        ("{CRAM-MD5}" + "0" * 64, False, True),
        ("{CRAM-MD5}" + "0" * 63, False, False),  # corrupt context
        ("{PLAIN.HEX}zz", False, False),  # corrupt encoding
        (DUMMY_HASH, False, False),
        ("{SHA512-CRYPT}$6$salt$abc", False, False),
        ("{SSHA512}abcd", False, False),
        ("{BLF-CRYPT}$2y$05$abc", False, False),
        ("{NOSUCH}x", False, False),
        ("plain", False, False),
    ],
)
def test_which_accounts_can_do_apop_and_cram_md5(stored: str, apop: bool, cram: bool) -> None:
    assert supports_apop(stored) is apop
    assert supports_cram_md5(stored) is cram
    assert (apop_digest(stored, APOP_TIMESTAMP) is not None) is apop
    assert (cram_md5_digest(stored, CRAM_CHALLENGE) is not None) is cram


def test_normalize_and_check_stored() -> None:
    assert normalize_stored("$6$salt$abc") == "{SHA512-CRYPT}$6$salt$abc"
    assert normalize_stored("$5$salt$abc") == "{SHA256-CRYPT}$5$salt$abc"
    assert normalize_stored("$2y$05$abc") == "{BLF-CRYPT}$2y$05$abc"
    assert normalize_stored("$2b$05$abc") == "{BLF-CRYPT}$2b$05$abc"
    assert normalize_stored("$argon2id$v=19$x") == "{ARGON2ID}$argon2id$v=19$x"
    assert normalize_stored("{crypt}$6$salt$abc") == "{crypt}$6$salt$abc"
    assert normalize_stored("{ssha512.hex}00") == "{ssha512.hex}00"
    for bad, fragment in [
        ("{MD5-CRYPT}$1$abc$def", "unknown password scheme {MD5-CRYPT}"),
        ("{CRYPT}$1$abc$def", "unsupported CRYPT variant"),
        ("$1$abc$def", "no {SCHEME} prefix"),
        ("hunter2", "no {SCHEME} prefix"),
        ("{ARGON2ID.HEX}00", "takes no encoding suffix"),
        ("{SHA512.ROT13}00", "unknown password scheme"),
        ("{}x", "malformed"),
        ("{PLAIN", "malformed"),
    ]:
        with pytest.raises(UnknownScheme, match=re.escape(fragment)):
            check_stored(bad)
        assert not is_known_scheme(bad)
        assert verify_password(bad, b"x") is False
    assert is_known_scheme("{CLEARTEXT}x")


# Stored values that start like a real scheme, so the property reaches each verifier.
_SCHEME_PREFIXES = [
    "{ARGON2ID}$argon2id$",
    "{BLF-CRYPT}$2y$",
    "{SHA512-CRYPT}$6$",
    "{SHA256-CRYPT}$5$rounds=",
    "{CRYPT}$6$",
    "$6$",
    "$2b$",
    "{SSHA512}",
    "{SSHA512.HEX}",
    "{SHA256}",
    "{CRAM-MD5}",
    "{CRAM-MD5.B64}",
    "{PLAIN.B64}",
    "{PLAIN.HEX}",
    "{PLAIN}",
]


@settings(max_examples=300)
@given(st.sampled_from(_SCHEME_PREFIXES), st.text(max_size=120), st.binary(max_size=100))
def test_scheme_specific_garbage_never_raises(prefix: str, rest: str, data: bytes) -> None:
    stored = prefix + rest
    assert verify_password(stored, data) in (True, False)
    assert supports_apop(stored) in (True, False)
    assert supports_cram_md5(stored) in (True, False)
    digest = apop_digest(stored, data)
    assert digest is None or len(digest) == 32
    digest = cram_md5_digest(stored, data)
    assert digest is None or len(digest) == 32
    assert is_known_scheme(stored) in (True, False)
