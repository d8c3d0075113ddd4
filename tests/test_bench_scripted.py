"""The benchmark's scripted clients: a reply is complete, and a success, only when it is."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from benchmarks.scripted import (
    POP3_MULTI,
    POP3_OK,
    greeting_and_quit,
    pop3_session,
    run_session,
    smtp_submission,
)


@pytest.mark.parametrize(
    ("reply", "expect", "verdict"),
    [
        (b"+OK hi\r\n", POP3_OK, True),
        (b"-ERR no\r\n", POP3_OK, False),
        (b"+OK hi", POP3_OK, None),
        (b"+OK 2 messages\r\n", POP3_MULTI, None),  # the body is still to come
        (b"+OK 2 messages\r\n1 abc\r\n", POP3_MULTI, None),
        (b"+OK\r\n.\r\n", POP3_MULTI, True),  # an empty body
        (b"+OK\r\nabc\r\n..dot\r\n.\r\n", POP3_MULTI, True),
        (b"-ERR no such message\r\n", POP3_MULTI, False),
        (b"220 ready\r\n", 220, True),
        (b"250-first\r\n250-PIPELINING\r\n", 250, None),  # a multi-line reply goes on
        (b"250-first\r\n250 SIZE\r\n", 250, True),
        (b"554 5.7.1 refused\r\n", 250, False),
        (b"235 2.7.0 ok\r\n", 250, False),
    ],
)
def test_a_reply_is_judged_only_when_complete(
    reply: bytes, expect: int, verdict: bool | None
) -> None:
    from benchmarks.scripted import _complete

    assert _complete(reply, expect) is verdict


def test_the_scripts_send_what_the_scenarios_say() -> None:
    pop3 = pop3_session("u@example.com", "pw", 2)
    assert [cmd for cmd, _ in pop3] == [
        None, b"USER u@example.com\r\n", b"PASS pw\r\n", b"STAT\r\n", b"UIDL\r\n",
        b"RETR 1\r\n", b"RETR 2\r\n", b"QUIT\r\n",
    ]  # fmt: skip
    smtp = smtp_submission("u@example.com", "pw", "r@example.com", b"body\r\n", 2)
    assert [expect for _, expect in smtp] == [220, 250, 235] + [250, 250, 354, 250] * 2 + [221]
    assert smtp[6][0] == b"body\r\n.\r\n"
    assert greeting_and_quit("smtp") == [(None, 220), (b"QUIT\r\n", 221)]


def test_a_session_runs_to_its_end_and_a_refusal_fails_it() -> None:
    async def scenario(refuse_rcpt: bool) -> list[bytes]:
        heard: list[bytes] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 hello\r\n")
            while line := await reader.readline():
                heard.append(line)
                verb = line[:4].upper()
                if verb == b"RCPT" and refuse_rcpt:
                    writer.write(b"550 5.1.1 no\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while (body := await reader.readline()) != b".\r\n":
                        heard.append(body)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb == b"EHLO":
                    writer.write(b"250-hi\r\n250 AUTH PLAIN\r\n")
                elif verb == b"AUTH":
                    writer.write(b"235 2.7.0 ok\r\n")
                else:
                    writer.write(b"250 ok\r\n")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        steps = smtp_submission("u@example.com", "pw", "r@example.com", b"hi\r\n", 1)
        try:
            await run_session(port, steps, None, 10.0)
        finally:
            server.close()
            await server.wait_closed()
        return heard

    heard = asyncio.run(scenario(False))
    assert heard[-1] == b"QUIT\r\n" and b"hi\r\n" in heard
    with pytest.raises(Exception, match="550"):
        asyncio.run(scenario(True))


def _run(figures: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    from dataclasses import asdict

    from benchmarks.report import Result

    result = Result(
        mode="full", started="t", duration_s=1.0, sizes={"rounds": 1, "duration": 1.0},
        machine={"cpus": 2, "python": "3"}, peers={"pop3": "dovecot", "submission": "postfix"},
        figures=figures,
    )  # fmt: skip
    data = asdict(result)
    data["_file"] = "previous.json"
    return data


def _table(current: dict[str, Any], previous: dict[str, Any], only: set[str] | None = None) -> str:
    from benchmarks.report import Result, markdown

    fields = {k: v for k, v in current.items() if k != "_file"}
    return markdown(Result(**fields), previous, only)


def _retr(mine: float, theirs: float, growth: float = 0.0) -> dict[str, dict[str, float]]:
    return {
        "mailgate": {"retr_mb_per_s": mine, "mem_growth_mb": growth},
        "dovecot": {"retr_mb_per_s": theirs, "mem_growth_mb": 0.0},
    }


def test_a_slower_machine_is_not_a_regression_but_losing_ground_to_the_peer_is() -> None:
    before = _run({"retr_big": _retr(1000, 400)})
    slower_machine = _table(_run({"retr_big": _retr(800, 320)}), before)
    assert "REGRESSION" not in slower_machine and "-20%" in slower_machine
    lost_ground = _table(_run({"retr_big": _retr(800, 400)}), before)
    assert "Regressions: RETR one big message: MB/s" in lost_ground


def test_growth_from_nothing_and_a_missing_figure_are_regressions() -> None:
    before = _run({"retr_big": _retr(1000, 400)})
    grew = _table(_run({"retr_big": _retr(1000, 400, growth=60.0)}), before)
    assert "server memory growth during RETR MB" in grew.split("Regressions:")[1]
    failed = _table(_run({}), before)
    assert "missing (failed?)" in failed and "Regressions: RETR one big message" in failed
    also_failed = _table(_run({}), before, only={"retr_big"})
    assert "Regressions: RETR one big message" in also_failed


def test_scenarios_left_out_with_only_are_not_missing() -> None:
    submit = {"mailgate": {"messages_per_s": 1500.0}, "postfix": {"messages_per_s": 900.0}}
    before = _run({"retr_big": _retr(1000, 400), "submit_1_per_conn": submit})
    table = _table(_run({"retr_big": _retr(1000, 400)}), before, only={"retr_big"})
    assert "missing" not in table and "REGRESSION" not in table
    everything = _table(_run({"retr_big": _retr(1000, 400)}), before)
    assert "Regressions: Submission x16, AUTH + 1 msg/conn" in everything


def test_only_huge_maildrop_covers_both_of_its_results() -> None:
    huge = {"mailgate": {"login_stat_s": 0.5}, "dovecot": {"login_stat_s": 2.0}}
    before = _run({"huge_maildrop_first": huge, "huge_maildrop_later": huge})
    failed = _table(_run({}), before, only={"huge_maildrop"})
    assert "Huge maildrop, first login" in failed.split("Regressions:")[1]
    assert "Huge maildrop, later logins" in failed.split("Regressions:")[1]
