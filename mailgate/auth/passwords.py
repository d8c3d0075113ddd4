"""Password hashing in Dovecot's ``{SCHEME}data`` notation.

Users are stored as ``{ARGON2ID}$argon2id$...`` by default, so a mailgate user file can be
read by Dovecot tooling and a Dovecot passwd-file can be imported. Schemes understood:
ARGON2ID, ARGON2I, BLF-CRYPT (bcrypt), SHA512-CRYPT, SHA256-CRYPT, CRYPT (by its ``$id$``),
SSHA512, SSHA256, SHA512, SHA256, PLAIN/CLEAR/CLEARTEXT and CRAM-MD5/HMAC-MD5, the binary
ones also with Dovecot's ``.HEX``/``.B64`` encoding suffix.

Verification never raises on a corrupt or unknown stored value: a broken entry must fail
the login, not crash the session. Every comparison is constant-time.

APOP and CRAM-MD5 make the server recompute a digest over the shared secret, so they work
only for schemes that keep a plaintext-equivalent secret: PLAIN/CLEAR (both) and CRAM-MD5
(Dovecot's precomputed HMAC-MD5 states: CRAM-MD5 only, it cannot give APOP's MD5).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Callable

import bcrypt
from argon2 import PasswordHasher, Type
from argon2.exceptions import Argon2Error, InvalidHashError

# New hashes use Dovecot 2.3's parameters (``doveadm pw -s ARGON2ID``: m=64 MiB, t=3, p=1;
# ARGON2I: m=32 MiB, t=4, p=1). The total work is the same as argon2-cffi's default p=4,
# but one lane is one thread: p=4 made each verification start 4 threads, oversubscribing
# the cores under concurrent logins. Verification always follows the stored parameters,
# so existing p=4 hashes keep working.
_ARGON2ID = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1, type=Type.ID)
_ARGON2I = PasswordHasher(time_cost=4, memory_cost=32768, parallelism=1, type=Type.I)

# A hash of a random secret nobody knows, made with the same parameters as hash_password():
# verifying against it costs what a real verification costs, so unknown users cannot be told
# apart from wrong passwords by timing.
DUMMY_HASH = (
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$K9ejP9ZViMSlV6xUMfZEeg"
    "$iO6UfuPayfoz5aR8EU+Z30Dhp6u8KHWUBfrEi+wP2jQ"
)

DEFAULT_SCHEME = "ARGON2ID"

# bcrypt cost for new BLF-CRYPT hashes: ~50 ms, about what one Argon2id verification costs.
BCRYPT_COST = 10

# SHA-crypt rounds: Drepper's default and bounds. Stored hashes asking for more than
# SHA_CRYPT_MAX_ROUNDS fail verification: this is pure Python, and a hand-edited
# ``rounds=999999999`` would otherwise pin a thread for an hour.
SHA_CRYPT_DEFAULT_ROUNDS = 5000
SHA_CRYPT_MIN_ROUNDS = 1000
SHA_CRYPT_MAX_ROUNDS = 1_000_000


class UnknownScheme(ValueError):
    """A stored password names a scheme (or crypt variant) mailgate cannot verify."""


def split_scheme(stored: str) -> tuple[str, str] | None:
    """``"{ARGON2ID}$argon2id$..."`` -> ``("ARGON2ID", "$argon2id$...")``; None if malformed."""
    if not stored.startswith("{"):
        return None
    end = stored.find("}")
    if end <= 1:
        return None
    return stored[1:end].upper(), stored[end + 1 :]


def scheme_of(stored: str) -> str | None:
    """The upper-case scheme name of a stored hash, or None when it has no ``{SCHEME}``."""
    parts = split_scheme(stored)
    return parts[0] if parts else None


# -- scheme resolution ----------------------------------------------------------------------

_ALIASES = {"CLEAR": "PLAIN", "CLEARTEXT": "PLAIN", "HMAC-MD5": "CRAM-MD5"}
_ENCODINGS = {"HEX": "HEX", "B64": "B64", "BASE64": "B64"}
# Schemes whose data is binary and so may carry an encoding suffix.
_BINARY_SCHEMES = frozenset({"PLAIN", "CRAM-MD5", "SHA256", "SHA512", "SSHA256", "SSHA512"})
# Prefixes of crypt(3) strings, for Dovecot's default scheme CRYPT and unprefixed passwords.
_CRYPT_PREFIXES = (
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2a$", "BLF-CRYPT"),
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
)


def _crypt_scheme(data: str) -> str | None:
    for prefix, scheme in _CRYPT_PREFIXES:
        if data.startswith(prefix):
            return scheme
    return None


def _resolve(stored: str) -> tuple[str, str, str]:
    """``stored`` -> (canonical scheme, encoding "" | "HEX" | "B64", data); UnknownScheme if not."""
    parts = split_scheme(stored)
    if parts is None:
        if stored.startswith("{"):
            raise UnknownScheme("malformed {SCHEME} prefix")
        # Dovecot's default scheme is CRYPT: an unprefixed crypt string names its own scheme.
        scheme = _crypt_scheme(stored)
        if scheme is None:
            raise UnknownScheme("password has no {SCHEME} prefix and is no known crypt string")
        return scheme, "", stored
    name, data = parts
    encoding = ""
    base, dot, suffix = name.rpartition(".")
    if dot and suffix in _ENCODINGS:
        name, encoding = base, _ENCODINGS[suffix]
    name = _ALIASES.get(name, name)
    if name == "CRYPT":
        scheme = _crypt_scheme(data)
        if scheme is None or not scheme.endswith("CRYPT") or encoding:
            raise UnknownScheme("unsupported CRYPT variant (only $6$, $5$ and $2y$/$2b$/$2a$)")
        return scheme, "", data
    if name not in _VERIFIERS:
        raise UnknownScheme(f"unknown password scheme {{{parts[0]}}}")
    if encoding and name not in _BINARY_SCHEMES:
        raise UnknownScheme(f"scheme {name} takes no encoding suffix")
    return name, encoding, data


def check_stored(stored: str) -> None:
    """Raise UnknownScheme (a ValueError, with a reason) unless ``stored`` names a known scheme.

    Only the scheme is checked, not the data: a corrupt hash of a known scheme simply never
    verifies.
    """
    _resolve(stored)


def normalize_stored(stored: str) -> str:
    """A Dovecot password field as mailgate stores it: unprefixed crypt strings get their
    ``{SCHEME}``; anything else known is returned unchanged. UnknownScheme otherwise."""
    scheme, _, data = _resolve(stored)
    return stored if stored.startswith("{") else "{" + scheme + "}" + data


def is_known_scheme(stored: str) -> bool:
    """Whether ``stored`` names a scheme we can verify."""
    try:
        _resolve(stored)
    except UnknownScheme:
        return False
    return True


# -- encodings --------------------------------------------------------------------------------

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def _decode(data: str, encoding: str) -> bytes:
    """Strict hex or base64; ValueError on anything else."""
    if encoding == "HEX":
        if len(data) % 2 or not set(data) <= _HEX_DIGITS:
            raise ValueError("bad hex")
        return bytes.fromhex(data)
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("bad base64") from None


def _decode_digest(data: str, encoding: str, size: int) -> bytes:
    """A raw digest of ``size`` bytes: hex when its length says so (Dovecot's rule), else base64."""
    if not encoding:
        encoding = "HEX" if len(data) == 2 * size else "B64"
    raw = _decode(data, encoding)
    if len(raw) != size:
        raise ValueError("digest of the wrong size")
    return raw


# -- plaintext-equivalent secrets: APOP and CRAM-MD5 --------------------------------------------


def _plain_secret(encoding: str, data: str) -> bytes:
    return data.encode("utf-8") if not encoding else _decode(data, encoding)


def plaintext_secret(stored: str) -> bytes | None:
    """The clear secret for PLAIN/CLEAR hashes (what APOP needs), else None."""
    try:
        scheme, encoding, data = _resolve(stored)
        if scheme != "PLAIN":
            return None
        return _plain_secret(encoding, data)
    except ValueError:  # UnknownScheme, bad encoding, unencodable text
        return None


def _cram_context(stored: str) -> bytes | None:
    """The 32-byte HMAC-MD5 context (outer then inner MD5 state) usable for CRAM-MD5, or None."""
    try:
        scheme, encoding, data = _resolve(stored)
        if scheme == "PLAIN":
            return hmac_md5_context(_plain_secret(encoding, data))
        if scheme == "CRAM-MD5":
            return _decode_digest(data, encoding, 32)
    except ValueError:
        return None
    return None


def supports_apop(stored: str) -> bool:
    """Whether APOP can be offered to this account (its secret is stored in clear)."""
    return plaintext_secret(stored) is not None


def supports_cram_md5(stored: str) -> bool:
    """Whether CRAM-MD5 can be offered to this account (clear secret or HMAC-MD5 context)."""
    return _cram_context(stored) is not None


def apop_digest(stored: str, timestamp: bytes) -> str | None:
    """RFC 1939 APOP: lowercase hex MD5(timestamp + secret); None if the scheme cannot do it.

    Compare the client's digest with :func:`hmac.compare_digest` after lower-casing it.
    """
    secret = plaintext_secret(stored)
    if secret is None:
        return None
    return hashlib.md5(timestamp + secret, usedforsecurity=False).hexdigest()


def cram_md5_digest(stored: str, challenge: bytes) -> str | None:
    """RFC 2195 CRAM-MD5: lowercase hex HMAC-MD5(secret, challenge); None if impossible.

    For ``{CRAM-MD5}`` entries the digest is finished from Dovecot's precomputed states, so
    the password itself is never needed.
    """
    context = _cram_context(stored)
    if context is None:
        return None
    outer = struct.unpack("<4I", context[:16])
    inner = struct.unpack("<4I", context[16:])
    inner_digest = _md5_finish(inner, challenge, already=64)
    return _md5_finish(outer, inner_digest, already=64).hex()


# -- MD5 with an exposed state (hashlib cannot start from a saved state) -------------------------

_MASK = 0xFFFFFFFF
_MD5_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MD5_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_MD5_K = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
_MD5_INDEX = [i if i < 16 else (5 * i + 1) % 16 if i < 32 else (3 * i + 5) % 16 if i < 48
              else (7 * i) % 16 for i in range(64)]  # fmt: skip

_State = tuple[int, int, int, int]


def _md5_compress(state: _State, block: bytes) -> _State:
    """One MD5 block (RFC 1321 section 3.4)."""
    a, b, c, d = state
    words = struct.unpack("<16I", block)
    for i in range(64):
        if i < 16:
            f = (b & c) | (~b & d)
        elif i < 32:
            f = (d & b) | (~d & c)
        elif i < 48:
            f = b ^ c ^ d
        else:
            f = c ^ (b | (~d & _MASK))
        f = (f + a + _MD5_K[i] + words[_MD5_INDEX[i]]) & _MASK
        shift = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + (((f << shift) | (f >> (32 - shift))) & _MASK)) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _md5_finish(state: _State, data: bytes, already: int) -> bytes:
    """The MD5 digest of a message whose first ``already`` bytes left ``state``, then ``data``."""
    total = already + len(data)
    padded = (
        data
        + b"\x80"
        + b"\0" * ((55 - total) % 64)
        + struct.pack("<Q", (total * 8) & 0xFFFFFFFFFFFFFFFF)
    )
    for offset in range(0, len(padded), 64):
        state = _md5_compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def hmac_md5_context(secret: bytes) -> bytes:
    """Dovecot's ``{CRAM-MD5}`` value (raw 32 bytes): MD5 states after the opad and ipad blocks.

    The layout is ``hmac_md5_get_cram_context()``'s: outer a,b,c,d then inner a,b,c,d, each a
    little-endian 32-bit word.
    """
    key = hashlib.md5(secret, usedforsecurity=False).digest() if len(secret) > 64 else secret
    key = key.ljust(64, b"\0")
    inner = _md5_compress(_MD5_INIT, bytes(k ^ 0x36 for k in key))
    outer = _md5_compress(_MD5_INIT, bytes(k ^ 0x5C for k in key))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


# -- SHA-crypt (Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512") ------------------------

_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _transpose(groups: int, step: int, rotate: Callable[[int], int]) -> list[int]:
    order: list[int] = []
    for i in range(groups):
        triple = [i, i + step, i + 2 * step]
        k = rotate(i) % 3
        order += triple[k:] + triple[:k]
    return order


# The byte order of the final encoding, straight from the spec's b64_from_24bit calls.
_SHA512_ORDER = [*_transpose(21, 21, lambda i: i), 63]
_SHA256_ORDER = [*_transpose(10, 10, lambda i: -i), 31, 30]


def _crypt_b64(digest: bytes, order: list[int]) -> str:
    out: list[str] = []
    body, tail = order[: len(order) - len(order) % 3], order[len(order) - len(order) % 3 :]
    for j in range(0, len(body), 3):
        w = (digest[body[j]] << 16) | (digest[body[j + 1]] << 8) | digest[body[j + 2]]
        for _ in range(4):
            out.append(_CRYPT_ALPHABET[w & 0x3F])
            w >>= 6
    if len(tail) == 1:  # SHA-512: (0, 0, last) as 2 characters
        w = digest[tail[0]]
        chars = 2
    else:  # SHA-256: (0, 31, 30) as 3 characters
        w = (digest[tail[0]] << 8) | digest[tail[1]]
        chars = 3
    for _ in range(chars):
        out.append(_CRYPT_ALPHABET[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha_crypt(password: bytes, setting: str) -> str:
    """crypt(3) for ``$5$``/``$6$`` settings (``$6$[rounds=N$]salt[$...]``).

    Returns the full crypt string; ValueError for a setting that is not SHA-crypt or asks
    for more than SHA_CRYPT_MAX_ROUNDS rounds.
    """
    if setting.startswith("$6$"):
        new, order = hashlib.sha512, _SHA512_ORDER
    elif setting.startswith("$5$"):
        new, order = hashlib.sha256, _SHA256_ORDER
    else:
        raise ValueError("not a SHA-crypt setting")
    prefix, rest = setting[:3], setting[3:]
    rounds = SHA_CRYPT_DEFAULT_ROUNDS
    custom_rounds = False
    if rest.startswith("rounds="):
        text, sep, rest = rest[len("rounds=") :].partition("$")
        if not sep or not text.isascii() or not text.isdigit() or len(text) > 10:
            raise ValueError("bad rounds")
        rounds = min(max(int(text), SHA_CRYPT_MIN_ROUNDS), 999_999_999)
        custom_rounds = True
    if rounds > SHA_CRYPT_MAX_ROUNDS:
        raise ValueError("too many rounds")
    salt_text = rest.split("$", 1)[0][:16]
    salt = salt_text.encode("utf-8")
    p = password

    b = new(p + salt + p).digest()
    a = new(p + salt + _repeat(b, len(p)))
    n = len(p)
    while n:
        a.update(b if n & 1 else p)
        n >>= 1
    c = a.digest()
    p_seq = _repeat(new(p * len(p)).digest(), len(p))
    s_seq = _repeat(new(salt * (16 + c[0])).digest(), len(salt))
    for i in range(rounds):
        h = new(p_seq if i & 1 else c)
        if i % 3:
            h.update(s_seq)
        if i % 7:
            h.update(p_seq)
        h.update(c if i & 1 else p_seq)
        c = h.digest()
    rounds_text = f"rounds={rounds}$" if custom_rounds else ""
    return f"{prefix}{rounds_text}{salt_text}${_crypt_b64(c, order)}"


def _sha_crypt_verify(encoded: str, password: bytes) -> bool:
    if encoded.count("$") < 3 or any(ch in encoded for ch in "\0\n:"):
        return False
    return hmac.compare_digest(sha_crypt(password, encoded).encode(), encoded.encode())


def _sha_crypt_hasher(prefix: str) -> Callable[[bytes], str]:
    def hash_(password: bytes) -> str:
        salt = "".join(secrets.choice(_CRYPT_ALPHABET) for _ in range(16))
        return sha_crypt(password, prefix + salt)

    return hash_


# -- the other schemes -------------------------------------------------------------------------


def _argon2_verifier(hasher: PasswordHasher, prefix: str) -> Callable[[str, str, bytes], bool]:
    def verify(encoding: str, encoded: str, password: bytes) -> bool:
        # The scheme label must agree with the encoded hash's own type.
        if not encoded.startswith(prefix):
            return False
        try:
            return hasher.verify(encoded, password)
        except (Argon2Error, InvalidHashError, ValueError):
            return False

    return verify


def _argon2_hasher(hasher: PasswordHasher) -> Callable[[bytes], str]:
    return hasher.hash


def _bcrypt_verify(encoded: str, password: bytes) -> bool:
    # crypt_blowfish (Dovecot) uses the first 72 bytes; pyca bcrypt refuses longer input.
    return bool(bcrypt.checkpw(password[:72], encoded.encode("ascii")))


def _bcrypt_hash(password: bytes) -> str:
    if len(password) > 72:
        raise ValueError("BLF-CRYPT passwords are limited to 72 bytes")
    # $2b$ and $2y$ are the same algorithm; $2y$ is what Dovecot itself writes.
    return "$2y$" + bcrypt.hashpw(password, bcrypt.gensalt(BCRYPT_COST)).decode("ascii")[4:]


def _plain_verify(encoding: str, data: str, password: bytes) -> bool:
    return hmac.compare_digest(_plain_secret(encoding, data), password)


def _plain_hash(password: bytes) -> str:
    return password.decode("utf-8")


def _cram_verify(encoding: str, data: str, password: bytes) -> bool:
    return hmac.compare_digest(_decode_digest(data, encoding, 32), hmac_md5_context(password))


def _cram_hash(password: bytes) -> str:
    return hmac_md5_context(password).hex()


def _digest_verifier(name: str, salted: bool) -> Callable[[str, str, bytes], bool]:
    size = hashlib.new(name).digest_size

    def verify(encoding: str, data: str, password: bytes) -> bool:
        if salted:
            raw = _decode(data, encoding or "B64")
            if len(raw) < size:
                return False
            digest, salt = raw[:size], raw[size:]
        else:
            digest, salt = _decode_digest(data, encoding, size), b""
        return hmac.compare_digest(hashlib.new(name, password + salt).digest(), digest)

    return verify


def _ssha512_hash(password: bytes) -> str:
    salt = secrets.token_bytes(16)
    return base64.b64encode(hashlib.sha512(password + salt).digest() + salt).decode("ascii")


def _sha_crypt_scheme_verifier(prefix: str) -> Callable[[str, str, bytes], bool]:
    def verify(encoding: str, data: str, password: bytes) -> bool:
        return data.startswith(prefix) and _sha_crypt_verify(data, password)

    return verify


def _bcrypt_scheme_verify(encoding: str, data: str, password: bytes) -> bool:
    return data.startswith(("$2y$", "$2b$", "$2a$")) and _bcrypt_verify(data, password)


# (encoding, data, password) -> bool; may raise on garbage, verify_password catches.
_VERIFIERS: dict[str, Callable[[str, str, bytes], bool]] = {
    "ARGON2ID": _argon2_verifier(_ARGON2ID, "$argon2id$"),
    "ARGON2I": _argon2_verifier(_ARGON2I, "$argon2i$"),
    "BLF-CRYPT": _bcrypt_scheme_verify,
    "SHA512-CRYPT": _sha_crypt_scheme_verifier("$6$"),
    "SHA256-CRYPT": _sha_crypt_scheme_verifier("$5$"),
    "SSHA512": _digest_verifier("sha512", salted=True),
    "SSHA256": _digest_verifier("sha256", salted=True),
    "SHA512": _digest_verifier("sha512", salted=False),
    "SHA256": _digest_verifier("sha256", salted=False),
    "PLAIN": _plain_verify,
    "CRAM-MD5": _cram_verify,
}

# What hash_password() can produce; password as UTF-8 bytes -> data after the {SCHEME}.
_HASHERS: dict[str, Callable[[bytes], str]] = {
    "ARGON2ID": _argon2_hasher(_ARGON2ID),
    "ARGON2I": _argon2_hasher(_ARGON2I),
    "BLF-CRYPT": _bcrypt_hash,
    "SHA512-CRYPT": _sha_crypt_hasher("$6$"),
    "SHA256-CRYPT": _sha_crypt_hasher("$5$"),
    "SSHA512": _ssha512_hash,
    "PLAIN": _plain_hash,
    "CLEAR": _plain_hash,
    "CRAM-MD5": _cram_hash,
}

HASH_SCHEMES = tuple(_HASHERS)
"""Scheme names accepted by :func:`hash_password` (and ``mailgate user add --scheme``)."""


def hash_password(password: str, scheme: str = DEFAULT_SCHEME) -> str:
    """Hash ``password`` for storage as ``{SCHEME}data``.

    ValueError for a scheme we cannot produce, a password with a line break or NUL, one that
    is not encodable as UTF-8 (a lone surrogate), or one too long for bcrypt.
    """
    name = scheme.upper()
    hasher = _HASHERS.get(name)
    if hasher is None:
        raise ValueError(f"unsupported password scheme {scheme!r}")
    if any(c in password for c in "\r\n\0"):
        raise ValueError("a password cannot contain a line break or NUL")
    try:
        raw = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a password must be valid Unicode text (no lone surrogates)") from None
    if hasher is _plain_hash and ":" in password:
        # A ':' would split the passwd-file line: Dovecot's base64 form keeps it one field.
        return "{" + name + ".B64}" + base64.b64encode(raw).decode("ascii")
    return "{" + name + "}" + hasher(raw)


def verify_password(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches ``stored``. False (never an exception) for bad stored data.

    A password containing NUL never matches: none can be stored (hash_password refuses it),
    and HMAC-MD5 contexts and crypt_blowfish would otherwise ignore trailing NULs.
    """
    if b"\0" in password:
        return False
    try:
        scheme, encoding, data = _resolve(stored)
        return bool(_VERIFIERS[scheme](encoding, data, password))
    except Exception:  # a corrupt entry must fail the login, never the session
        return False
