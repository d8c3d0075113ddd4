"""mailgate: a strict, safe POP3 and SMTP submission gateway built on Twisted."""

__version__ = "0.1.0"
