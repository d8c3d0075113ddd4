"""The ``mailgate`` admin command: manage accounts in STATE_DIR/users.

    mailgate [--state-dir DIR] user add [--scheme SCHEME] ADDRESS
    mailgate [--state-dir DIR] user passwd [--scheme SCHEME] ADDRESS
    mailgate [--state-dir DIR] user del ADDRESS
    mailgate [--state-dir DIR] user list
    mailgate [--state-dir DIR] user import [--domain DOMAIN] FILE
    mailgate [--state-dir DIR] transcripts list | show ID
    mailgate probe URL [--user U] [--password P] [--insecure | --cafile F]

The password comes from stdin when it is not a terminal (one line, so scripts can pipe it)
and from two getpass prompts when it is. New passwords are ARGON2ID unless ``--scheme``
says otherwise; PLAIN and CRAM-MD5 keep a plaintext-equivalent secret, which APOP (PLAIN
only) and CRAM-MD5 logins need. ``import`` reads a Dovecot passwd-file: every line is
checked first and any bad one aborts the whole import; accounts that already exist are
skipped with a warning. Failures print one ``mailgate: error: ...`` line
on stderr and exit non-zero; nothing is ever half-written (the user file is rewritten
atomically by :class:`~mailgate.auth.userdb.UserFile`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mailgate.auth.passwords import DEFAULT_SCHEME, HASH_SCHEMES, hash_password
from mailgate.auth.userdb import UserFile, read_passwd_file
from mailgate.cliparse import Parser, ParserExit
from mailgate.errors import AddressError, UserDatabaseError
from mailgate.lab.cli import probe_command, transcripts_command
from mailgate.model import Address, parse_account
from mailgate.queue.cli import queue_command

DEFAULT_STATE_DIR = "./mailgate-data"

GetPass = Callable[[str], str]


class CommandError(Exception):
    """A user-facing failure; its text becomes the one ``mailgate: error:`` line."""


def _build_parser() -> Parser:
    parser = Parser(prog="mailgate", description="mailgate administration")
    parser.add_argument(
        "--state-dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"state directory holding 'users' and 'mail/' (default {DEFAULT_STATE_DIR})",
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    user = groups.add_parser("user", help="manage accounts")
    actions = user.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("add", "create an account and its Maildir; password from stdin or a prompt"),
        ("passwd", "change an account's password"),
        ("del", "delete an account (its mail is kept on disk)"),
    ):
        sub = actions.add_parser(name, help=text)
        if name != "del":
            sub.add_argument(
                "--scheme",
                type=str.upper,
                choices=HASH_SCHEMES,
                default=DEFAULT_SCHEME,
                metavar="SCHEME",
                help=f"password scheme: {', '.join(HASH_SCHEMES)} (default {DEFAULT_SCHEME})",
            )
        sub.add_argument("address", metavar="ADDRESS", help="full account address local@domain")
    actions.add_parser("list", help="list accounts, one per line")
    imp = actions.add_parser(
        "import", help="add the accounts of a Dovecot passwd-file (user:{SCHEME}hash:...)"
    )
    imp.add_argument(
        "--domain", metavar="DOMAIN", help="domain for user names without one (user -> user@DOMAIN)"
    )
    imp.add_argument("file", metavar="FILE", help="Dovecot passwd-file to read")
    queue = groups.add_parser(
        "queue",
        help="inspect and steer the outbound queue: list|show|hold|release|retry|delete|flush",
    )
    queue.add_argument("queue_args", nargs=argparse.REMAINDER, metavar="ACTION [ID]")
    transcripts = groups.add_parser(
        "transcripts", help="recorded wire transcripts of lab listeners: list | show ID"
    )
    transcripts.add_argument("transcript_args", nargs=argparse.REMAINDER, metavar="ACTION [ID]")
    probe = groups.add_parser(
        "probe",
        help="read-only conformance checks against a POP3/SMTP server (see probe --help)",
        add_help=False,
    )
    probe.add_argument("probe_args", nargs=argparse.REMAINDER, metavar="URL [OPTIONS]")
    return parser


def _parse_address(text: str) -> Address:
    if "@" not in text:
        raise CommandError(f"address {text!r} has no domain (use local@domain)")
    try:
        return parse_account(text, default_domain="")
    except AddressError as e:
        raise CommandError(f"bad address {text!r}: {e}") from None


def _read_password(stdin: IO[str], getpass_fn: GetPass) -> str:
    if stdin.isatty():
        first = getpass_fn("New password: ")
        if getpass_fn("Retype new password: ") != first:
            raise CommandError("passwords do not match")
        password = first
    else:
        password = stdin.readline()
        if password.endswith("\n"):
            password = password[:-1]
        if password.endswith("\r"):
            password = password[:-1]
    if not password:
        raise CommandError("empty password")
    if any(c in password for c in "\x00\r\n"):
        raise CommandError("password contains a control character it cannot be typed with")
    return password


def _hash(password: str, scheme: str) -> str:
    try:
        return hash_password(password, scheme)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _make_maildir(state_dir: str, address: Address) -> None:
    maildir = os.path.join(state_dir, "mail", address.domain, address.local, "Maildir")
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)


class _Commands:
    def __init__(self, state_dir: str, stdin: IO[str], stdout: IO[str], getpass_fn: GetPass):
        self.state_dir = state_dir
        self.users_path = os.path.join(state_dir, "users")
        self.stdin = stdin
        self.stdout = stdout
        self.getpass_fn = getpass_fn

    def db(self) -> UserFile:
        return UserFile(self.users_path)

    def add(self, text: str, scheme: str = DEFAULT_SCHEME) -> None:
        address = _parse_address(text)
        if address in self.db().list():  # fail before asking for a password
            raise CommandError(f"user {address} already exists")
        password = _read_password(self.stdin, self.getpass_fn)
        password_hash = _hash(password, scheme)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.db().add(address, password_hash)
        _make_maildir(self.state_dir, address)

    def passwd(self, text: str, scheme: str = DEFAULT_SCHEME) -> None:
        address = _parse_address(text)
        if address not in self.db().list():
            raise CommandError(f"no such user {address}")
        password = _read_password(self.stdin, self.getpass_fn)
        self.db().set_hash(address, _hash(password, scheme))

    def import_file(self, path: str, domain: str | None, stderr: IO[str]) -> None:
        if domain is not None:
            try:
                parse_account("postmaster", default_domain=domain)
            except AddressError:
                raise CommandError(f"bad domain {domain!r}") from None
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not valid UTF-8") from None
        accounts, problems = read_passwd_file(text, path, domain)
        if problems:
            for problem in problems[:-1]:
                stderr.write(f"mailgate: error: {' '.join(problem.split())}\n")
            raise CommandError(f"{problems[-1]} (nothing imported)")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        skipped = set(self.db().add_many(accounts))
        for address, _ in accounts:
            if address in skipped:
                stderr.write(f"mailgate: warning: user {address} already exists, skipped\n")
            else:
                _make_maildir(self.state_dir, address)
        count = len(accounts) - len(skipped)
        self.stdout.write(f"imported {count} users\n")

    def delete(self, text: str) -> None:
        self.db().delete(_parse_address(text))

    def list(self) -> None:
        self.stdout.write("".join(f"{a}\n" for a in self.db().list()))


def main(
    argv: list[str],
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    *,
    getpass_fn: GetPass | None = None,
) -> int:
    """Run one admin command; returns the exit status (0 ok, 1 failure, 2 usage)."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    if argv[:1] == ["probe"]:  # its own parser: options may come before the URL
        return probe_command(argv[1:], stdout, stderr, os.environ)
    try:
        args = _build_parser().parse_args(argv)
    except ParserExit as e:
        (stdout if e.status == 0 else stderr).write(e.text)
        return e.status
    if args.group == "queue":
        return queue_command(Path(args.state_dir), args.queue_args, stdout, stderr)
    if args.group == "transcripts":
        return transcripts_command(Path(args.state_dir), args.transcript_args, stdout, stderr)
    if args.group == "probe":
        return probe_command(args.probe_args, stdout, stderr, os.environ)
    commands = _Commands(args.state_dir, stdin, stdout, getpass_fn or getpass.getpass)
    try:
        if args.action == "list":
            commands.list()
        elif args.action == "add":
            commands.add(args.address, args.scheme)
        elif args.action == "passwd":
            commands.passwd(args.address, args.scheme)
        elif args.action == "import":
            commands.import_file(args.file, args.domain, stderr)
        elif args.action == "del":
            commands.delete(args.address)
        else:  # pragma: no cover - argparse only accepts the choices above
            raise CommandError(f"unknown action {args.action!r}")
    except (CommandError, UserDatabaseError) as e:
        message = " ".join(str(e).split())
        stderr.write(f"mailgate: error: {message}\n")
        return 1
    except OSError as e:
        stderr.write(f"mailgate: error: {e.filename or args.state_dir}: {e.strerror}\n")
        return 1
    except (KeyboardInterrupt, EOFError):
        stderr.write("mailgate: error: interrupted\n")
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr))
