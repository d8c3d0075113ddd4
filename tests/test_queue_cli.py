"""``queue`` admin commands against a spool on disk."""

from __future__ import annotations

import io
from pathlib import Path

from mailgate.model import Address
from mailgate.queue.cli import queue_command
from mailgate.queue.spool import QueueEntry, RecipientState, SpoolDirectory

ALICE = Address("alice", "example.com")
BOB = Address("bob", "remote.example")


def make_entry(spool: SpoolDirectory, state: str, created: float = 1_700_000_000) -> str:
    queue_id = spool.new_id(created)
    directory = spool.root / "tmp" / queue_id
    directory.mkdir()
    (directory / "message").write_bytes(b"Subject: Lunch\nFrom: alice@example.com\n\nbody text\n")
    entry = QueueEntry(queue_id, ALICE, [RecipientState(BOB)], created, next_attempt=created)
    if state == "deferred":
        entry.attempts = 2
        entry.next_attempt = created + 600
        entry.last_error = "<bob@remote.example>: 451 4.7.1 greylisted"
        entry.recipients[0].code = 451
        entry.recipients[0].text = "4.7.1 greylisted"
    spool.commit_new(queue_id, entry)
    if state != "incoming":
        spool.move(queue_id, "incoming", state)
    return queue_id


def run(state_dir: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = queue_command(state_dir, list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def setup(tmp_path: Path) -> tuple[SpoolDirectory, str, str, str]:
    spool = SpoolDirectory(tmp_path / "spool")
    spool.ensure()
    return (
        spool,
        make_entry(spool, "deferred"),
        make_entry(spool, "deferred"),
        make_entry(spool, "hold"),
    )


def test_list(tmp_path: Path) -> None:
    _, d1, d2, held = setup(tmp_path)
    code, out, err = run(tmp_path, "queue", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[-1] == "incoming 0, active 0, deferred 2, hold 1, corrupt 0"
    row = next(line for line in lines if line.startswith(d1))
    assert "deferred" in row and "<alice@example.com> -> bob@remote.example" in row
    assert "next attempt 2023-11-14 22:23:20" in row
    assert "2023-11-14 22:13:20" in row
    assert any(line.startswith(held) and " hold " in line for line in lines)
    assert any(line.startswith(d2) for line in lines)


def test_show(tmp_path: Path) -> None:
    _, d1, _, _ = setup(tmp_path)
    code, out, _ = run(tmp_path, "show", d1)
    assert code == 0
    assert f"id: {d1}" in out
    assert "state: deferred" in out
    assert "recipient: <bob@remote.example> pending 451 4.7.1 greylisted" in out
    assert "last error: <bob@remote.example>: 451 4.7.1 greylisted" in out
    assert out.endswith("Subject: Lunch\nFrom: alice@example.com\n")
    assert "body text" not in out


def test_hold_release_retry_delete_flush(tmp_path: Path) -> None:
    spool, d1, d2, held = setup(tmp_path)
    assert run(tmp_path, "release", held)[0] == 0
    assert spool.find(held) == "incoming"
    assert run(tmp_path, "hold", held)[0] == 0
    assert spool.find(held) == "hold"
    assert run(tmp_path, "retry", d1)[0] == 0
    assert spool.find(d1) == "incoming"
    code, out, _ = run(tmp_path, "flush")
    assert code == 0 and out.startswith("1 ")
    assert spool.find(d2) == "incoming"
    assert run(tmp_path, "delete", d2)[0] == 0
    assert spool.find(d2) is None
    assert run(tmp_path, "list")[1].splitlines()[-1] == (
        "incoming 1, active 0, deferred 0, hold 1, corrupt 0"
    )


def test_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    _, _, _, held = setup(tmp_path)
    for argv in (
        ("show", "NOSUCHID0000000000"),
        ("delete", "../../etc/passwd"),
        ("retry", held),
        ("frobnicate",),
        ("show",),
        (),
    ):
        code, out, err = run(tmp_path, *argv)
        assert code != 0, argv
        assert out == ""
        assert err.startswith("mailgate: error: ") and err.count("\n") == 1, (argv, err)
    assert "NOSUCHID0000000000" in run(tmp_path, "show", "NOSUCHID0000000000")[2]
