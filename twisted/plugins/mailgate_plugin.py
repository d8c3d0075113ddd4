"""twistd plugin: ``twistd mailgate``. Lazy, so listing plugins imports nothing heavy."""

from twisted.application.service import ServiceMaker

mailgate = ServiceMaker(  # type: ignore[no-untyped-call]
    "mailgate",
    "mailgate.tap",
    "POP3 and SMTP submission gateway (STLS/STARTTLS, AUTH, Maildir)",
    "mailgate",
)
