"""One table of absolute figures and mailgate/peer ratios; JSON + markdown results on disk."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REGRESSION = 0.10

# (scenario, figure, label, better: "higher" | "lower" | "")
ROWS: list[tuple[str, str, str, str]] = [
    (
        "pop3_session",
        "sessions_per_s",
        "POP3 session x16 (login, STAT, UIDL, 10xRETR 10K), {PLAIN} accounts: sessions/s",
        "higher",
    ),
    ("pop3_session", "server_cpu_ms_per_op", "  server CPU ms/session", "lower"),
    (
        "pop3_session",
        "pool_cpu_ms_per_op",
        "  of which off the reactor (Maildir I/O) ms",
        "",
    ),
    ("pop3_session", "reactor_cpu_ms_per_op", "  of which reactor thread ms", ""),
    ("pop3_session", "peak_mem_mb", "  peak server memory MB (PSS)", "lower"),
    ("pop3_session", "client_cpu_util", "  load generator CPU (cores)", ""),
    ("pop3_session", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    ("pop3s_session", "sessions_per_s", "POP3S session x16: sessions/s", "higher"),
    ("pop3s_session", "server_cpu_ms_per_op", "  server CPU ms/session", "lower"),
    ("pop3s_session", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    (
        "pop3_session_argon2",
        "sessions_per_s",
        "POP3 session x16, Argon2id accounts: sessions/s",
        "higher",
    ),
    ("pop3_session_argon2", "server_cpu_ms_per_op", "  server CPU ms/session", "lower"),
    ("retr_big", "retr_mb_per_s", "RETR one big message: MB/s", "higher"),
    ("retr_big", "server_cpu_ms_per_mb", "  server CPU ms/MB", "lower"),
    ("retr_big", "client_cpu_ms_per_mb", "  load generator CPU ms/MB", ""),
    ("retr_big", "mem_growth_mb", "  server memory growth during RETR MB", "lower"),
    ("retr_big", "peak_mem_mb", "  peak server memory MB", "lower"),
    ("retr_big", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    (
        "retr_big_unmarked",
        "retr_mb_per_s",
        "RETR, same message named without ,D=0 (delivered by another program): MB/s",
        "higher",
    ),
    ("retr_big_unmarked", "server_cpu_ms_per_mb", "  server CPU ms/MB", "lower"),
    ("huge_maildrop_first", "login_stat_s", "Huge maildrop, first login: login+STAT s", "lower"),
    ("huge_maildrop_first", "uidl_s", "  UIDL s", "lower"),
    ("huge_maildrop_first", "server_cpu_s", "  server CPU s (whole session)", "lower"),
    (
        "huge_maildrop_first",
        "reactor_lag_max_ms",
        "  max reactor lag ms, all its logins (mailgate's probe)",
        "",
    ),
    ("huge_maildrop_later", "login_stat_s", "Huge maildrop, later logins: login+STAT s", "lower"),
    ("huge_maildrop_later", "uidl_s", "  UIDL s", "lower"),
    ("huge_maildrop_later", "server_cpu_s", "  server CPU s (whole session)", "lower"),
    ("idle", "held", "Idle authenticated POP3 connections held", "higher"),
    ("idle", "kb_per_conn", "  memory per connection KB", "lower"),
    ("idle", "total_mem_mb", "  total server memory MB", "lower"),
    ("idle", "logins_per_s", "  logins/s while opening ({PLAIN} users)", "higher"),
    ("idle", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    ("submit_1_per_conn", "messages_per_s", "Submission x16, AUTH + 1 msg/conn: msgs/s", "higher"),
    ("submit_1_per_conn", "server_cpu_ms_per_op", "  server CPU ms/message", "lower"),
    (
        "submit_1_per_conn",
        "pool_cpu_ms_per_op",
        "  of which off the reactor (fsync) ms",
        "",
    ),
    ("submit_1_per_conn", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    (
        "submit_100_per_conn",
        "messages_per_s",
        "Submission x16, AUTH + 100 msgs/conn: msgs/s",
        "higher",
    ),
    ("submit_100_per_conn", "server_cpu_ms_per_op", "  server CPU ms/message", "lower"),
    ("submit_100_per_conn", "peak_mem_mb", "  peak server memory MB", "lower"),
    ("submit_100_per_conn", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    ("pop3s_handshake", "handshakes_per_s", "POP3S handshakes/s (x16)", "higher"),
    ("pop3s_handshake", "server_cpu_ms_per_op", "  server CPU ms/handshake", "lower"),
    ("pop3s_handshake", "client_cpu_util", "  load generator CPU (cores)", ""),
    ("pop3s_handshake", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
    ("submissions_handshake", "handshakes_per_s", "Submissions handshakes/s (x16)", "higher"),
    ("submissions_handshake", "server_cpu_ms_per_op", "  server CPU ms/handshake", "lower"),
    ("submissions_handshake", "client_cpu_util", "  load generator CPU (cores)", ""),
    ("submissions_handshake", "reactor_lag_max_ms", "  max reactor lag ms (mailgate's probe)", ""),
]

SMTP_SCENARIOS = ("submit", "submissions")


@dataclass
class Result:
    mode: str
    started: str
    duration_s: float
    sizes: dict[str, Any]
    machine: dict[str, Any]
    peers: dict[str, str]
    figures: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def _get(result: dict[str, Any], scenario: str, server: str, fig: str) -> float | None:
    value = result.get("figures", {}).get(scenario, {}).get(server, {}).get(fig)
    return float(value) if value is not None else None


def previous(results: Path, mode: str) -> dict[str, Any] | None:
    """The latest saved run of the same mode, if any."""
    files = sorted(results.glob(f"*-{mode}.json"))
    if not files:
        return None
    data: dict[str, Any] = json.loads(files[-1].read_text())
    data["_file"] = files[-1].name
    return data


def _selected(scenario: str, only: Collection[str]) -> bool:
    """Whether ``--only`` ran this result's scenario (huge_maildrop gives huge_maildrop_first
    and huge_maildrop_later)."""
    return any(scenario == name or scenario.startswith(name + "_") for name in only)


def markdown(
    result: Result, prev: dict[str, Any] | None, only: Collection[str] | None = None
) -> str:
    """The table; ``only`` (from ``--only``) names the scenarios run, so that the others'
    absent figures are not reported as failures."""
    cur = asdict(result)
    lines = [
        f"# mailgate benchmark ({result.mode}, {result.started})",
        "",
        f"Machine: {result.machine['cpus']} CPUs, Python {result.machine['python']}, "
        f"load generator on {result.machine.get('loop', 'asyncio')}. "
        f"Peers: POP3 {result.peers['pop3']}, submission {result.peers['submission']} "
        "(Postfix CPU and memory include Dovecot's auth service). Medians of "
        f"{result.sizes['rounds']} round(s); {result.sizes['duration']:.0f} s per load run.",
        "",
        "| scenario / figure | mailgate | peer | mailgate/peer | vs previous | ratio vs previous |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    regressions = []
    for scenario, fig, label, better in ROWS:
        smtp = scenario.startswith(SMTP_SCENARIOS)
        peer = result.peers["submission" if smtp else "pop3"]
        mine = _get(cur, scenario, "mailgate", fig)
        if mine is None:
            if only is not None and not _selected(scenario, only):
                continue
            if better and prev is not None and _get(prev, scenario, "mailgate", fig) is not None:
                lines.append(f"| {label} | missing (failed?) | | | **REGRESSION** | |")
                regressions.append(label.strip())
            continue
        theirs = _get(cur, scenario, peer, fig) if peer != "n/a" else None
        ratio = f"{mine / theirs:.2f}" if mine is not None and theirs else "n/a"
        change = ratio_change = ""
        if prev is not None and mine is not None:
            old = _get(prev, scenario, "mailgate", fig)
            old_theirs = _get(prev, scenario, peer, fig) if peer != "n/a" else None
            delta = ratio_delta = None
            if old:
                delta = (mine - old) / old
                change = f"{delta:+.0%}"
            elif old == 0 and better == "lower" and mine > 0:
                delta = float("inf")  # e.g. memory growth during RETR, which was none
                change = "was 0"
            if old and theirs and old_theirs:
                ratio_delta = (mine / theirs) / (old / old_theirs) - 1
                ratio_change = f"{ratio_delta:+.0%}"
            # Against the peer where there is one: the same machine runs both, so a
            # slower machine moves both and the ratio only moves with the code.
            judged = ratio_delta if ratio_delta is not None else delta
            if better and judged is not None:
                worse = judged < -REGRESSION if better == "higher" else judged > REGRESSION
                if worse:
                    target = "ratio_change" if ratio_delta is not None else "change"
                    if target == "ratio_change":
                        ratio_change += " **REGRESSION**"
                    else:
                        change += " **REGRESSION**"
                    regressions.append(label.strip())
        peer_cell = f"{_fmt(theirs)} ({peer})" if theirs is not None else "n/a"
        lines.append(
            f"| {label} | {_fmt(mine)} | {peer_cell} | {ratio} | {change} | {ratio_change} |"
        )
    lines.append("")
    if prev is not None:
        lines.append(
            f"Compared with {prev['_file']}. A regression is a figure >10% worse against the"
            " peer's in the same run (the ratio column) where the peer has it, else >10%"
            " worse outright: between runs this 2-core machine's own speed moves every"
            " figure, the peers' too, by up to ~25%."
        )
        if regressions:
            lines.append("Regressions: " + "; ".join(regressions))
        else:
            lines.append("No regression over 10%.")
    else:
        lines.append("No previous run of this mode to compare with.")
    errors = [
        f"{sc}/{srv}: {int(f['errors'])}"
        for sc, per in result.figures.items()
        for srv, f in per.items()
        if f.get("errors")
    ]
    if errors:
        lines.append("Client-side errors (failed operations, not counted): " + ", ".join(errors))
    return "\n".join(lines) + "\n"


def save(results: Path, result: Result, text: str) -> list[Path]:
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    json_path = results / f"{stamp}-{result.mode}.json"
    md_path = results / f"{stamp}-{result.mode}.md"
    json_path.write_text(json.dumps(asdict(result), indent=1, sort_keys=True) + "\n")
    md_path.write_text(text)
    return [json_path, md_path]
