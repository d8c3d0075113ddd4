"""The layering of ARCHITECTURE.md, enforced: protocols never reach into storage or config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mailgate"

# module prefix -> mailgate modules it may import
ALLOWED: dict[str, set[str]] = {
    "mailgate.model": {"mailgate.errors"},
    "mailgate.errors": set(),
    "mailgate.interfaces": {"mailgate.model", "mailgate.errors"},
    "mailgate.wire": set(),
    "mailgate.sasl": {"mailgate.interfaces", "mailgate.model", "mailgate.errors"},
    "mailgate.pop3": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.sasl",
        "mailgate.wire",
        "mailgate.pop3",
        "mailgate.dataread",
        "mailgate.headers",
        "mailgate.recipients",
        # Only the pure fail2ban line and penalty timer; the throttle itself is injected.
        "mailgate.authlog",
        "mailgate.session",
    },
    "mailgate.smtp": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.sasl",
        "mailgate.wire",
        "mailgate.smtp",
        "mailgate.dataread",
        "mailgate.headers",
        # Only the pure fail2ban line and penalty timer; the throttle itself is injected.
        "mailgate.authlog",
        "mailgate.session",
    },
    "mailgate.store": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.wire",
        "mailgate.store",
        "mailgate.fileio",
    },
    "mailgate.auth": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.auth",
        "mailgate.authlog",
    },
    "mailgate.authlog": set(),
    "mailgate.session": set(),
    "mailgate.limits": {"mailgate.authlog"},
    "mailgate.lab": {
        "mailgate.interfaces",
        "mailgate.config",
        "mailgate.lab",
        "mailgate.errors",
        "mailgate.cliparse",
    },
    "mailgate.cliparse": set(),
    "mailgate.queue": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.queue",
    },
    "mailgate.relay": {
        "mailgate.interfaces",
        "mailgate.model",
        "mailgate.errors",
        "mailgate.wire",
        "mailgate.relay",
    },
    "mailgate.realm": {"mailgate.interfaces", "mailgate.model", "mailgate.errors"},
    "mailgate.recipients": {"mailgate.model", "mailgate.errors"},
    "mailgate.tls": {"mailgate.model", "mailgate.errors", "mailgate.fileio"},
    "mailgate.fileio": set(),
    "mailgate.config": {"mailgate.model", "mailgate.errors"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def mailgate_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mailgate"))
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mailgate")
        ):
            if node.module == "mailgate":
                found.update(f"mailgate.{a.name}" for a in node.names)
            else:
                found.add(node.module)
    return found


def covered(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_module_imports_only_what_its_layer_may(path: Path) -> None:
    name = module_name(path)
    rule = next((k for k in ALLOWED if name == k or name.startswith(k + ".")), None)
    if rule is None:
        return  # composition root, admin, testing, demo: may import anything
    bad = {m for m in mailgate_imports(path) if not covered(m, ALLOWED[rule])}
    assert not bad, f"{name} imports {sorted(bad)}"
