"""The user database: a Dovecot passwd-file-like text file.

One account per line, ``local@domain:{SCHEME}hash``; ``#`` comments and blank lines are
allowed, and extra ``:``-separated fields after the hash are tolerated and written back
unchanged. ``tomllib`` only reads, so accounts live here where the admin CLI can rewrite
them atomically; the running server notices the change by a cheap stat at most once a
second and reloads.

The hash is anything :mod:`mailgate.auth.passwords` can verify; as in Dovecot (whose default
scheme is CRYPT) an unprefixed ``$6$``/``$5$``/``$2y$``/``$argon2id$`` string stands for its
obvious scheme. An unknown scheme is an error naming the file and line, at load, rather
than an account nobody can ever log in to. :func:`read_passwd_file` reads a real Dovecot
passwd-file for ``mailgate user import``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from mailgate.auth.passwords import normalize_stored
from mailgate.errors import AddressError, UserDatabaseError
from mailgate.interfaces import IUserDatabase
from mailgate.model import Address, parse_account

_log = Logger()

RELOAD_INTERVAL = 1.0


class UserExists(UserDatabaseError):
    """``add`` of an account that is already there."""


class NoSuchUser(UserDatabaseError):
    """``set_hash``/``delete`` of an account that is not there."""


@dataclass(frozen=True)
class _Entry:
    """One account line, keeping its original spelling and extra fields for rewriting."""

    address: Address
    name: str
    password_hash: str  # as written in the file
    extra: tuple[str, ...]
    # What verification uses: password_hash with an implied {SCHEME} made explicit.
    stored: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.stored:
            object.__setattr__(self, "stored", normalize_stored(self.password_hash))

    def render(self) -> str:
        return ":".join((self.name, self.password_hash, *self.extra))


_Line = _Entry | str  # a str is a comment or blank line, kept verbatim
_Lines = list[_Line]


def parse_account_name(text: str) -> Address:
    """A full ``local@domain`` account name; a bare name is refused (no default domain here)."""
    if "@" not in text:
        raise AddressError("account name has no domain")
    return parse_account(text, default_domain="")


def check_hash(password_hash: str) -> None:
    """Refuse a hash that would break the file format or whose scheme we cannot verify."""
    if any(c in password_hash for c in ":\r\n\x00"):
        raise UserDatabaseError("password hash contains a forbidden character")
    if not password_hash:
        raise UserDatabaseError("empty password hash")
    try:
        normalize_stored(password_hash)
    except ValueError as e:
        raise UserDatabaseError(str(e)) from None


def parse_lines(text: str, source: str) -> list[_Line]:
    """Parse the whole file; any malformed line raises UserDatabaseError naming its number."""
    lines: list[_Line] = []
    seen: dict[Address, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            lines.append(line)
            continue
        fields = line.split(":")
        if len(fields) < 2:
            raise UserDatabaseError(f"{source}:{number}: expected ADDRESS:{{SCHEME}}HASH")
        name, password_hash, extra = fields[0], fields[1], tuple(fields[2:])
        try:
            address = parse_account_name(name)
        except AddressError as e:
            raise UserDatabaseError(f"{source}:{number}: bad account name ({e})") from None
        try:
            check_hash(password_hash)
        except UserDatabaseError as e:
            raise UserDatabaseError(f"{source}:{number}: {e}") from None
        if address in seen:
            raise UserDatabaseError(
                f"{source}:{number}: duplicate account {address} (first on line {seen[address]})"
            )
        seen[address] = number
        lines.append(_Entry(address, name, password_hash, extra))
    # A trailing newline yields one empty last element; do not turn it into a blank line.
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_passwd_file(
    text: str, source: str, default_domain: str | None = None
) -> tuple[list[tuple[Address, str]], list[str]]:
    """Accounts of a Dovecot passwd-file (``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra``).

    Returns ``(accounts, problems)``: each account as (address, hash in ``{SCHEME}data``
    form); each problem one ``source:line: reason`` text, so an import can report every bad
    line and write nothing. Bare user names take ``default_domain``; without one they are a
    problem. The fields after the password are Dovecot's userdb data and are not kept.
    """
    accounts: list[tuple[Address, str]] = []
    problems: list[str] = []
    seen: dict[Address, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        fields = line.split(":")
        if len(fields) < 2:
            problems.append(f"{where}: expected USER:{{SCHEME}}PASSWORD[:...]")
            continue
        name, password_hash = fields[0], fields[1]
        if "@" not in name and not default_domain:
            problems.append(f"{where}: user name {name!r} has no domain (use --domain)")
            continue
        try:
            address = parse_account(name, default_domain=default_domain or "")
        except AddressError as e:
            problems.append(f"{where}: bad user name {name!r} ({e})")
            continue
        if not password_hash:
            problems.append(f"{where}: {address} has an empty password")
            continue
        try:
            check_hash(password_hash)
        except UserDatabaseError as e:
            problems.append(f"{where}: {address}: {e}")
            continue
        if address in seen:
            problems.append(f"{where}: duplicate user {address} (first on line {seen[address]})")
            continue
        seen[address] = number
        accounts.append((address, normalize_stored(password_hash)))
    return accounts, problems


_AddressList = list[Address]
_Signature = tuple[int, int, int, int] | None


@implementer(IUserDatabase)
class UserFile:
    """Accounts read from ``path``, reloaded when the file changes.

    ``clock`` (seconds, monotonic) is injectable so tests control the once-a-second stat.
    A missing file is an empty database. A file broken by a hand edit after start-up is
    logged and the previous accounts stay in force; at construction it raises.
    """

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] | None = None):
        self.path = os.fspath(path)
        self._clock = clock or time.monotonic
        self._lines: _Lines = []
        self._by_address: dict[Address, _Entry] = {}
        self._summaries: dict[tuple[object, bool], bool] = {}
        self._signature: _Signature = None
        self._checked_at = self._clock()
        #: Set by a server: re-read and parse changed files there, off the reactor thread
        #: (a 100,000-account file takes about a second); lookups keep the old accounts
        #: until the new ones are in. None (the CLI): reload inline.
        self.background: Callable[..., Any] | None = None
        self._reloading = False
        self._load(strict=True)

    # -- IUserDatabase -------------------------------------------------------------------

    def get_password_hash(self, address: Address) -> str | None:
        """The account's hash, always in ``{SCHEME}data`` form (see passwords.normalize_stored)."""
        self._maybe_reload()
        entry = self._by_address.get(address)
        return entry.stored if entry else None

    def exists(self, address: Address) -> bool:
        self._maybe_reload()
        return address in self._by_address

    def any_hash(self, predicate: Callable[[str], bool]) -> bool:
        """Whether some account's hash satisfies ``predicate``.

        E.g. ``users.any_hash(passwords.supports_apop)``: could APOP succeed for anyone.
        Answers are remembered until the file changes, so asking per connection is cheap.
        """
        return self._summary(predicate, every=False)

    def all_hash(self, predicate: Callable[[str], bool]) -> bool:
        """Whether there are accounts and every account's hash satisfies ``predicate``."""
        return self._summary(predicate, every=True)

    def _summary(self, predicate: Callable[[str], bool], every: bool) -> bool:
        self._maybe_reload()
        key = (predicate, every)
        cached = self._summaries.get(key)
        if cached is None:
            # Generators: stop at the first answer (predicates can cost an HMAC each).
            results = (predicate(e.stored) for e in self._by_address.values())
            cached = (bool(self._by_address) and all(results)) if every else any(results)
            self._summaries[key] = cached
        return cached

    # -- administration (the CLI) --------------------------------------------------------

    def list(self) -> _AddressList:
        """Every account, sorted by its ``local@domain`` text."""
        self._load(strict=True)
        return sorted(self._by_address, key=str)

    def add(self, address: Address, password_hash: str) -> None:
        """Append a new account; UserExists if it is already there."""
        check_hash(password_hash)
        with self._locked():
            self._load(strict=True)
            if address in self._by_address:
                raise UserExists(f"user {address} already exists")
            self._write([*self._lines, _Entry(address, str(address), password_hash, ())])

    def add_many(self, accounts: Iterable[tuple[Address, str]]) -> _AddressList:
        """Append every account not already there, in one atomic write; returns those skipped."""
        accounts = tuple(accounts)
        for _, password_hash in accounts:
            check_hash(password_hash)
        with self._locked():
            self._load(strict=True)
            skipped: _AddressList = []
            new: _Lines = []
            seen = set(self._by_address)
            for address, password_hash in accounts:
                if address in seen:
                    skipped.append(address)
                    continue
                seen.add(address)
                new.append(_Entry(address, str(address), password_hash, ()))
            if new:
                self._write([*self._lines, *new])
            return skipped

    def set_hash(self, address: Address, password_hash: str) -> None:
        """Replace an account's hash, keeping its line, spelling and extra fields."""
        check_hash(password_hash)
        with self._locked():
            self._load(strict=True)
            if address not in self._by_address:
                raise NoSuchUser(f"no such user {address}")
            self._write(
                [
                    _Entry(ln.address, ln.name, password_hash, ln.extra)
                    if isinstance(ln, _Entry) and ln.address == address
                    else ln
                    for ln in self._lines
                ]
            )

    def delete(self, address: Address) -> None:
        """Remove an account's line."""
        with self._locked():
            self._load(strict=True)
            if address not in self._by_address:
                raise NoSuchUser(f"no such user {address}")
            self._write(
                [ln for ln in self._lines if not (isinstance(ln, _Entry) and ln.address == address)]
            )

    # -- internals -----------------------------------------------------------------------

    def _stat_signature(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        # The inode changes on every atomic rewrite, even within one mtime tick.
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked_at < RELOAD_INTERVAL:
            return
        self._checked_at = now
        if self._stat_signature() != self._signature:
            self.reload()

    def reload(self) -> None:
        """Re-read the file now (SIGHUP); in the background when a runner is set."""
        if self.background is None:
            self._load(strict=False)
            return
        if self._reloading:
            return
        self._reloading = True

        def done(result: tuple[_Signature, Any]) -> None:
            self._reloading = False
            self._apply(*result, strict=False)

        def crashed(failure: Any) -> None:
            self._reloading = False
            _log.failure("user database reload failed", failure)

        self.background(self._read).addCallbacks(done, crashed)

    def _read(self) -> tuple[_Signature, Any]:
        """Blocking part of a load: (signature, parsed lines or the error)."""
        signature = self._stat_signature()
        try:
            if signature is None:
                text = ""
            else:
                with open(self.path, "rb") as f:
                    text = f.read().decode("utf-8")
            return signature, parse_lines(text, self.path)
        except (OSError, UnicodeDecodeError, UserDatabaseError) as e:
            return signature, e

    def _load(self, strict: bool) -> None:
        self._apply(*self._read(), strict=strict)

    def _apply(self, signature: _Signature, lines: Any, strict: bool) -> None:
        if isinstance(lines, Exception):
            e = lines
            # Remember the broken version so it is not re-parsed every second.
            self._signature = signature
            if isinstance(e, UnicodeDecodeError):
                e = UserDatabaseError(f"{self.path}: not valid UTF-8")
            elif isinstance(e, OSError):
                e = UserDatabaseError(f"{self.path}: cannot read ({e.strerror})")
            if strict:
                raise e from None
            _log.error("user database not reloaded, keeping previous accounts: {error}", error=e)
            return
        self._signature = signature
        self._lines = lines
        self._by_address = {ln.address: ln for ln in lines if isinstance(ln, _Entry)}
        self._summaries.clear()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write between concurrent CLI runs."""
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise UserDatabaseError(f"{self.path}: cannot lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, lines: _Lines) -> None:
        """Write atomically: temp file in the same directory, fsync, rename, fsync the dir."""
        text = "".join((ln.render() if isinstance(ln, _Entry) else ln) + "\n" for ln in lines)
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp_path: str | None = None
        try:
            fd, tmp_path = tempfile.mkstemp(
                prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=directory
            )
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, self.path)
            tmp_path = None
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise UserDatabaseError(f"{self.path}: cannot write ({e.strerror})") from None
        finally:
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)
        self._load(strict=True)
