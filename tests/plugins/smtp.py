"""A local SMTP server (aiosmtpd) that keeps every mail it is sent: the second way operators are told."""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from examples.local_env import free_port
from tests.waiting import wait_until


@dataclass
class ReceivedMail:
    envelope_to: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str:
        """The plain-text part of the mail, decoded."""
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None, f"no text/plain part in {self.message}"
        return str(part.get_content())


@dataclass
class SmtpServer:
    host: str
    port: int
    mails: list[ReceivedMail] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def mailto(self, to: str = "ops@example.com", sender: str = "icd@example.com") -> str:
        """The Apprise URL of this server: plain SMTP (no TLS, no login), as a local relay takes it."""
        return f"mailto://{self.host}:{self.port}?from={sender}&to={to}&mode=insecure"

    def wait_for_mail(self, subject_contains: str, timeout: float = 60) -> ReceivedMail:
        def found() -> ReceivedMail | None:
            with self._lock:
                return next((mail for mail in self.mails if subject_contains in mail.subject), None)

        return wait_until(found, timeout=timeout, message=f"no mail with {subject_contains!r} in its subject")

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd calls it by this name
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.mails.append(ReceivedMail(list(envelope.rcpt_tos), message))
        return "250 OK"


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    """A started SMTP server on a free loopback port for the session; it keeps every mail."""
    server = SmtpServer("127.0.0.1", free_port())
    controller = Controller(server, hostname=server.host, port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()
