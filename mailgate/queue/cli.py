"""``mailgate queue ...``: inspect and steer the spool on disk, without a reactor.

The running server notices what this changes: its runner rescans incoming/ and deferred/ on
a timer (every 30 s by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mailgate.queue.spool import (
    QUEUE_STATES,
    CorruptEntry,
    EntryNotFound,
    SpoolDirectory,
    is_queue_id,
)

__all__ = ["USAGE", "queue_command"]

USAGE = "usage: queue list | show ID | hold ID | release ID | retry ID | delete ID | flush"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _list(spool: SpoolDirectory, out: IO[str]) -> None:
    out.write(f"{'ID':<21} {'STATE':<9} {'SIZE':>8}  {'ARRIVAL':<19}  SENDER -> RECIPIENTS\n")
    for state in QUEUE_STATES:
        for queue_id in spool.ids(state):
            size = spool.message_size(state, queue_id)
            try:
                entry = spool.read_envelope(state, queue_id)
            except (CorruptEntry, EntryNotFound) as e:
                out.write(f"{queue_id:<21} {state:<9} {size:>8}  {'?':<19}  ({e})\n")
                continue
            sender = f"<{entry.sender}>" if entry.sender else "<>"
            pending = [str(r.address) for r in entry.pending]
            rcpts = ", ".join(pending) if pending else "(none pending)"
            line = f"{queue_id:<21} {state:<9} {size:>8}  {_when(entry.created):<19}  {sender} -> "
            line += rcpts
            if state == "deferred":
                line += f"; next attempt {_when(entry.next_attempt)}"
            out.write(line + "\n")
    counts = spool.counts()
    out.write(", ".join(f"{state} {counts[state]}" for state in QUEUE_STATES) + "\n")


def _show(spool: SpoolDirectory, queue_id: str, out: IO[str]) -> None:
    state = spool.find(queue_id)
    if state is None:
        raise EntryNotFound(f"no such queue entry: {queue_id}")
    entry = spool.read_envelope(state, queue_id)
    out.write(f"id: {queue_id}\nstate: {state}\n")
    out.write(f"size: {spool.message_size(state, queue_id)}\n")
    out.write(f"arrival: {_when(entry.created)}\n")
    out.write(f"sender: <{entry.sender or ''}>\n")
    out.write(f"attempts: {entry.attempts}\n")
    if entry.attempts:
        out.write(f"next attempt: {_when(entry.next_attempt)}\n")
    if entry.last_error:
        out.write(f"last error: {entry.last_error}\n")
    for r in entry.recipients:
        detail = f" {r.code} {r.text}" if r.code else ""
        out.write(f"recipient: <{r.address}> {r.status}{detail}\n")
    out.write("\n")
    with spool.open_message(state, queue_id) as f:
        head = f.read(64 * 1024)
    end = head.find(b"\n\n")
    out.write(head[: end + 1 if end >= 0 else len(head)].decode("utf-8", "replace"))


def queue_command(state_dir: Path, argv: list[str], stdout: IO[str], stderr: IO[str]) -> int:
    """Run one queue subcommand; 0 on success, 1 with one ``mailgate: error:`` line if not."""
    args = list(argv)
    if args[:1] == ["queue"]:
        args = args[1:]
    spool = SpoolDirectory(Path(state_dir) / "spool")

    def error(text: str) -> int:
        stderr.write(f"mailgate: error: {text}\n")
        return 1

    if not args:
        return error(USAGE)
    verb, rest = args[0], args[1:]
    with_id: dict[str, Callable[[str], None]] = {
        "hold": spool.hold,
        "release": spool.release,
        "retry": spool.retry,
        "delete": spool.delete,
    }
    try:
        if verb in ("list", "flush"):
            if rest:
                return error(f"queue {verb} takes no arguments")
            spool.ensure()
            if verb == "list":
                _list(spool, stdout)
            else:
                stdout.write(f"{spool.flush()} deferred entries moved to incoming\n")
            return 0
        if verb == "show" or verb in with_id:
            if len(rest) != 1:
                return error(f"queue {verb} takes one queue id")
            queue_id = rest[0]
            if not is_queue_id(queue_id):
                return error(f"no such queue entry: {queue_id}")
            if verb == "show":
                _show(spool, queue_id, stdout)
            else:
                with_id[verb](queue_id)
                stdout.write(f"{queue_id}: {verb} done\n")
            return 0
    except EntryNotFound as e:
        return error(str(e))
    except CorruptEntry as e:
        return error(f"queue entry {rest[0] if rest else ''} is corrupt: {e}")
    except OSError as e:
        return error(f"cannot access the spool: {e.strerror or 'I/O error'}")
    return error(f"unknown queue command {verb!r}; {USAGE}")
