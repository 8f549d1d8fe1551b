"""Where `crm-pulse alerts notify` delivers a message: Slack (bot token or incoming webhook), e-mail over SMTP,
a Teams webhook, a generic webhook signed with HMAC-SHA256; and the retries around one delivery."""

from __future__ import annotations

import abc
import hashlib
import hmac
import http.client
import logging
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import parsedate_to_datetime
from typing import Callable, ClassVar

import orjson

from crm_pulse.config import Settings, SettingsInvalid

log = logging.getLogger(__name__)

MAX_DELAY_SECONDS = 30.0
# The default folds a header at 78 characters, which can put a long subject wholly on a continuation line;
# 998 is the RFC 5322 limit.
UNFOLDED = default_policy.clone(max_line_length=998)
SIGNATURE_HEADER = "X-CRM-Pulse-Signature"
SNOOZE = "Snooze this lead"
TIMESTAMP_HEADER = "X-CRM-Pulse-Timestamp"


class Retryable(Exception):
    """A failure that may pass: a connection error, a timeout, HTTP 429 or 5xx, SMTP 4xx."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class Rejected(Exception):
    """A failure that retrying will not mend: a wrong URL or token, a refused payload or address."""


@dataclass(frozen=True)
class Message:
    """What one alert says, in plain text; each channel renders it in its own format."""

    headline: str
    facts: str
    details: str
    link: str | None
    snooze: str | None = None  # a signed link that stops this lead's alerts for a while

    @property
    def text(self) -> str:
        return f"{self.headline}: {self.facts}"


def _escape(text: str) -> str:
    # The three characters Slack's mrkdwn treats as control sequences.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(message: Message) -> dict:
    """`text` (the notification fallback), a mrkdwn section with the link to the CRM record, and the details."""
    section = f"*{_escape(message.headline)}*\n{_escape(message.facts)}"
    if message.link:
        section += f"\n<{message.link}|Open in the CRM>"
    if message.snooze:
        section += f"\n<{message.snooze}|{SNOOZE}>"
    return {
        "text": message.text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": section}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _escape(message.details)}]},
        ],
    }


def teams_payload(message: Message) -> dict:
    """An Adaptive Card message, which Teams' Workflows webhooks and the older connectors both accept."""
    card = {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": message.headline, "weight": "Bolder", "wrap": True},
            {"type": "TextBlock", "text": message.facts, "wrap": True},
            {"type": "TextBlock", "text": message.details, "isSubtle": True, "size": "Small", "wrap": True},
        ],
        "actions": [{"type": "Action.OpenUrl", "title": title, "url": url}
                    for title, url in (("Open in the CRM", message.link), (SNOOZE, message.snooze)) if url],
    }
    return {"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}]}


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None


def post_json(url: str, body: bytes, timeout_seconds: float, headers: dict[str, str] | None = None) -> bytes:
    """POST `body`; the response body, or Retryable (connection error, timeout, 429, 5xx) or Rejected (4xx)."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code != 429 and exc.code < 500:
            raise Rejected(f"HTTP {exc.code}") from None
        raise Retryable(f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))) from None
    except (OSError, http.client.HTTPException) as exc:
        raise Retryable(repr(exc)) from None


def deliver_with_retries(channel: str, send: Callable[[], None], max_attempts: int, backoff_seconds: float) -> str | None:
    """Call `send` until it succeeds (None), is Rejected, or has failed `max_attempts` times (the reason).
    Retryable failures wait `backoff_seconds` × 2^(attempt − 1), or the server's Retry-After, at most 30 s."""
    for attempt in range(1, max_attempts + 1):
        try:
            send()
            return None
        except Rejected as exc:
            log.error("%s answered %s; retrying would not help", channel, exc)
            return str(exc)
        except Retryable as exc:
            error, retry_after = str(exc), exc.retry_after
        if attempt < max_attempts:
            wait = backoff_seconds * 2 ** (attempt - 1) if retry_after is None else retry_after
            delay = min(max(wait, 0), MAX_DELAY_SECONDS)
            log.warning("%s attempt %d/%d failed (%s); retrying in %.1fs", channel, attempt, max_attempts, error, delay)
            time.sleep(delay)
    log.error("%s attempt %d/%d failed (%s); giving up", channel, max_attempts, max_attempts, error)
    return f"{error} after {max_attempts} attempts"


class Channel(abc.ABC):
    """A destination. `per_recipient` channels address each recipient (`address`: a Slack id, an e-mail
    address); the others post each alert once, to wherever they are configured to post."""

    name: ClassVar[str]
    per_recipient: ClassVar[bool] = False

    @abc.abstractmethod
    def send(self, message: Message, alert: dict, address: str | None) -> None:
        """`alert` as published; a per-recipient channel may be sent a group of alerts, with the first."""


@dataclass
class SlackBot(Channel):
    """chat.postMessage with a bot token, to a rep's user id (a direct message) or a channel."""

    name = "slack"
    per_recipient = True
    token: str
    api_url: str
    timeout_seconds: float

    def send(self, message: Message, alert: dict, address: str | None) -> None:
        body = orjson.dumps({"channel": address, **slack_payload(message)})
        answer = orjson.loads(post_json(self.api_url, body, self.timeout_seconds,
                                        {"Authorization": f"Bearer {self.token}"}))  # fmt: skip
        # The Web API answers HTTP 200 with ok=false for most errors; only rate limits are worth retrying.
        if not answer.get("ok"):
            error = f"Slack error {answer.get('error')}"
            raise Retryable(error) if answer.get("error") == "ratelimited" else Rejected(error)


@dataclass
class RenderedWebhook(Channel):
    """Posts each alert once, in the format `render` makes, to a URL that holds its own credential."""

    render: ClassVar[Callable[[Message], dict]]
    url: str
    timeout_seconds: float

    def send(self, message: Message, alert: dict, address: str | None) -> None:
        post_json(self.url, orjson.dumps(self.render(message)), self.timeout_seconds)


class SlackWebhook(RenderedWebhook):
    name = "slack"
    render = staticmethod(slack_payload)


class TeamsWebhook(RenderedWebhook):
    name = "teams"
    render = staticmethod(teams_payload)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 of `<timestamp>.<body>`: the timestamp is signed too, so a receiver can refuse replays."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass
class SignedWebhook(Channel):
    """The alert as published, with the message, POSTed with an HMAC signature a receiver can check."""

    name = "webhook"
    url: str
    secret: bytes
    timeout_seconds: float

    def send(self, message: Message, alert: dict, address: str | None) -> None:
        body = orjson.dumps({"alert": alert, "text": message.text, "link": message.link, "snooze_link": message.snooze})
        timestamp = str(int(time.time()))
        headers = {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(self.secret, timestamp, body)}
        post_json(self.url, body, self.timeout_seconds, headers)


@dataclass
class Email(Channel):
    name = "email"
    per_recipient = True
    host: str
    port: int
    starttls: bool
    username: str | None
    password: str | None
    sender: str
    cafile: str | None
    timeout_seconds: float

    def send(self, message: Message, alert: dict, address: str | None) -> None:
        email = EmailMessage(policy=UNFOLDED)
        email["Subject"], email["From"], email["To"] = message.headline, self.sender, address
        snooze = f"{SNOOZE}: {message.snooze}" if message.snooze else None
        email.set_content("\n\n".join(filter(None, (message.facts, message.link, snooze, message.details))) + "\n")
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_seconds) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context(cafile=self.cafile))
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(email)
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            raise (Retryable if 400 <= code < 500 else Rejected)(f"SMTP {code} {reply.decode(errors='replace')}") from None
        except smtplib.SMTPResponseException as exc:
            error = f"SMTP {exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
            raise (Retryable if 400 <= exc.smtp_code < 500 else Rejected)(error) from None
        except ssl.SSLCertVerificationError as exc:
            raise Rejected(f"the SMTP server's certificate: {exc.verify_message}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise Retryable(repr(exc)) from None


def configure_channels(settings: Settings, webhook_url: str | None, timeout_seconds: float) -> list[Channel]:
    """The channels of CRM_PULSE_NOTIFY_CHANNELS, or SettingsInvalid naming the setting a channel lacks."""

    def secret(value) -> str | None:
        return value.get_secret_value() if value else None

    channels: list[Channel] = []
    for name in sorted(settings.notify_channels):
        if name == "slack" and settings.slack_bot_token:
            channels.append(SlackBot(secret(settings.slack_bot_token), settings.slack_api_url, timeout_seconds))
        elif name == "slack" and (webhook_url or settings.webhook_url):
            channels.append(SlackWebhook(webhook_url or secret(settings.webhook_url), timeout_seconds))
        elif name == "email" and settings.smtp_host and settings.smtp_from:
            channels.append(Email(
                settings.smtp_host, settings.smtp_port, settings.smtp_starttls, settings.smtp_username,
                secret(settings.smtp_password), settings.smtp_from, settings.smtp_cafile, timeout_seconds,
            ))  # fmt: skip
        elif name == "teams" and settings.teams_webhook_url:
            channels.append(TeamsWebhook(secret(settings.teams_webhook_url), timeout_seconds))
        elif name == "webhook" and settings.signed_webhook_url and settings.signed_webhook_secret:
            channels.append(SignedWebhook(
                secret(settings.signed_webhook_url), secret(settings.signed_webhook_secret).encode(), timeout_seconds
            ))  # fmt: skip
        else:
            needs = {
                "slack": "CRM_PULSE_SLACK_BOT_TOKEN, or --webhook-url URL or CRM_PULSE_WEBHOOK_URL",
                "email": "CRM_PULSE_SMTP_HOST and CRM_PULSE_SMTP_FROM",
                "teams": "CRM_PULSE_TEAMS_WEBHOOK_URL",
                "webhook": "CRM_PULSE_SIGNED_WEBHOOK_URL and CRM_PULSE_SIGNED_WEBHOOK_SECRET",
            }[name]
            raise SettingsInvalid(f"alerts notify sends to {name} (CRM_PULSE_NOTIFY_CHANNELS) and needs {needs}")
    if settings.smtp_username and not settings.smtp_password and "email" in settings.notify_channels:
        raise SettingsInvalid("CRM_PULSE_SMTP_USERNAME is set without CRM_PULSE_SMTP_PASSWORD; set both or neither")
    return channels
