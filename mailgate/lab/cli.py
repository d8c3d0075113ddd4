"""``mailgate transcripts list|show ID`` and ``mailgate probe URL``: the admin CLI's lab groups.

Both return an exit status and write to the streams they are given (admin.main's contract).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from mailgate.cliparse import Parser, ParserExit
from mailgate.lab.transcript import find_transcript, format_list, format_show, list_transcripts
from mailgate.lab.transcript import read_events as _read_events

TRANSCRIPTS_USAGE = "usage: mailgate [--state-dir DIR] transcripts list | show ID\n"


def transcript_dir(state_dir: Path) -> Path:
    """Where the service writes transcripts (the composition root uses the same path)."""
    return Path(state_dir) / "transcripts"


def transcripts_command(
    state_dir: Path, args: Sequence[str], stdout: IO[str], stderr: IO[str]
) -> int:
    """``list``: one row per session; ``show ID``: the session in C:/S: form."""
    directory = transcript_dir(state_dir)
    if list(args) == ["list"]:
        stdout.write(format_list(list_transcripts(directory)))
        return 0
    if len(args) == 2 and args[0] == "show":
        try:
            path = find_transcript(directory, args[1])
            events = _read_events(path)
        except LookupError as e:
            stderr.write(f"mailgate: error: {e.args[0]}\n")
            return 1
        except OSError as e:
            stderr.write(f"mailgate: error: {e.filename}: {e.strerror}\n")
            return 1
        stdout.write(format_show(events))
        return 0
    stderr.write(TRANSCRIPTS_USAGE)
    return 2


def _probe_parser() -> Parser:
    parser = Parser(
        prog="mailgate probe",
        description="read-only conformance checks against a POP3 or SMTP server",
    )
    parser.add_argument("url", help="pop3://, pop3s://, smtp:// or smtps://HOST[:PORT]")
    parser.add_argument("--user", help="login for the checks that need one (UIDL stability)")
    parser.add_argument(
        "--password", help="its password (or set MAILGATE_PROBE_PASSWORD, kept out of ps)"
    )
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    tls.add_argument("--cafile", help="verify the certificate against these CA(s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per operation")
    return parser


def probe_command(
    args: Sequence[str],
    stdout: IO[str],
    stderr: IO[str],
    environ: Mapping[str, str],
) -> int:
    """Run the probe; exit 0 when no check FAILed, 1 otherwise, 2 on a usage error."""
    from mailgate.lab.probe import ProbeOptions, format_report, run_probe

    try:
        opts = _probe_parser().parse_args(list(args))
    except ParserExit as e:
        (stdout if e.status == 0 else stderr).write(e.text)
        return e.status
    password = opts.password or environ.get("MAILGATE_PROBE_PASSWORD")
    if opts.user and not password:
        stderr.write("mailgate: error: --user needs --password or MAILGATE_PROBE_PASSWORD\n")
        return 2
    try:
        options = ProbeOptions.from_url(
            opts.url,
            user=opts.user,
            password=password,
            insecure=opts.insecure,
            cafile=opts.cafile,
            timeout=opts.timeout,
        )
    except ValueError as e:
        stderr.write(f"mailgate: error: {e}\n")
        return 2
    checks = run_probe(options)
    stdout.write(format_report(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0
