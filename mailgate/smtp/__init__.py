"""SMTP submission (RFC 6409) on ports 587 (STARTTLS) and 465 (implicit TLS)."""

from __future__ import annotations

from mailgate.smtp.server import SmtpFactory, SmtpProfile, SmtpServer, SmtpSettings

__all__ = ["SmtpFactory", "SmtpProfile", "SmtpServer", "SmtpSettings"]
