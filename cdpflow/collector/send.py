"""`cdpflow send`: recorded or generated events through a collector, at a set pace (load and demo).

    cdpflow send --input out/sample/events --collector http://127.0.0.1:8088 --write-key K \
        [--rate 500] [--batch-size 100] [--live]

Events go in arrival (`receivedAt`) order, in `/v1/batch` requests. A 503 or 429 is retried
after its `Retry-After` (with backoff), so nothing is lost while Kafka is away; a batch refused
with another 4xx (one bad event refuses its whole batch) is sent again event by event, so only
the bad events are refused, and each is reported. Lines that are not JSON objects cannot be
sent and are counted.

`--live` makes the events happen now: each event's times (`timestamp`, `originalTimestamp`,
`sentAt`) are moved by the same amount as its `receivedAt`, to the moment it is sent. An event
keeps its own lateness and clock skew, so a generated history sent through a collector is not
rightly refused as days late.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import orjson
import requests

from cdpflow.core.timeutil import format_ts, parse_ts
from cdpflow.errors import BadInput

TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")


class SendFailed(RuntimeError):
    """The collector kept refusing (503/429) or stayed away past the send's patience."""


@dataclass
class SendReport:
    """What a send did."""

    sent: int = 0
    accepted: int = 0
    refused: List[Tuple[str, int, str]] = field(default_factory=list)  # (messageId, status, reason)
    unsendable: int = 0
    retries: int = 0
    seconds: float = 0.0
    request_seconds: List[float] = field(default_factory=list)  # per accepted request, for latency figures

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0


def live(event: Dict[str, Any], now_us: int) -> Dict[str, Any]:
    """The event moved in time so that it is received now, keeping its lateness and skew."""
    try:
        shift = now_us - parse_ts(event["receivedAt"])
    except (KeyError, TypeError, ValueError):
        return event
    moved = dict(event)
    for name in TIME_FIELDS + ("receivedAt",):
        try:
            moved[name] = format_ts(parse_ts(event[name]) + shift)
        except (KeyError, TypeError, ValueError):
            continue  # a field absent or unreadable stays as it was (validation will judge it)
    return moved


class Sender:
    """Sends batches to one collector, retrying what the collector asks to be retried.

    Args:
      collector: the collector's base URL.
      write_key: sent as the HTTP Basic user.
      max_wait_s: how long one batch may keep being retried (503/429) before the send fails.
      first_contact_s: how long to try a collector that has not answered once (refused
        connections) before saying no collector is there.
    """

    def __init__(self, collector: str, write_key: str, max_wait_s: float = 300.0, first_contact_s: float = 5.0):
        self.url = collector.rstrip("/") + "/v1/batch"
        self.session = requests.Session()
        self.session.auth = (write_key, "")
        self.max_wait_s = max_wait_s
        # A collector that never answered at all (a wrong address, nothing started) is a mistake
        # to say soon; one that answered before and is now away (a restart) is waited for.
        self.first_contact_s = first_contact_s
        self.answered = False

    def _post(self, events: Sequence[Dict[str, Any]], report: SendReport) -> requests.Response:
        begun = time.monotonic()
        deadline, backoff = begun + self.max_wait_s, 0.5
        while True:
            started = time.perf_counter()
            try:
                answer = self.session.post(self.url, data=orjson.dumps({"batch": list(events)}),
                                           headers={"Content-Type": "application/json"}, timeout=60)
            except requests.ConnectionError as err:
                answer, failure = None, str(err)
                if not self.answered and time.monotonic() - begun >= self.first_contact_s:
                    raise BadInput(f"no collector answers at {self.url} (tried for {self.first_contact_s:.0f} s): "
                                   f"is it running (`cdpflow serve collector`) and is the address right?") from None
            except requests.RequestException as err:
                raise BadInput(f"--collector {self.url}: {err}") from None
            else:
                self.answered = True
                failure = None
                if answer.status_code not in (429, 503):
                    if answer.status_code == 200:
                        report.request_seconds.append(time.perf_counter() - started)
                    return answer
            if time.monotonic() > deadline:
                raise SendFailed(f"the collector at {self.url} kept refusing for {self.max_wait_s:.0f} s: "
                                 f"{failure or answer.status_code}; {report.accepted} event(s) were accepted before")
            report.retries += 1
            wait = float(answer.headers.get("Retry-After", backoff)) if answer is not None else backoff
            if not self.answered:
                # Never past the first-contact limit: the mistake is said when it is reached.
                wait = min(wait, max(0.05, begun + self.first_contact_s - time.monotonic()))
            time.sleep(min(wait, 30.0))
            backoff = min(backoff * 2, 30.0)

    def send_batch(self, events: Sequence[Dict[str, Any]], report: SendReport) -> None:
        answer = self._post(events, report)
        report.sent += len(events)
        if answer.status_code == 200:
            report.accepted += len(events)
            return
        if len(events) == 1:
            report.refused.append((str(events[0].get("messageId")), answer.status_code, _reason(answer)))
            return
        # One bad event refuses its batch: send each again, so only the bad ones are refused.
        report.sent -= len(events)
        for event in events:
            self.send_batch([event], report)


def _reason(answer: requests.Response) -> str:
    try:
        return str(answer.json().get("error"))
    except ValueError:
        return answer.text[:200]


def send(lines: Sequence[bytes], collector: str, write_key: str, rate: Optional[float] = None,
         batch_size: int = 100, is_live: bool = False) -> SendReport:
    """Sends raw event lines (in the order given) at `rate` events/s at most (None: as fast as the collector takes them)."""
    sender = Sender(collector, write_key)
    report = SendReport()
    events: List[Dict[str, Any]] = []
    for line in lines:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        else:
            report.unsendable += 1
    started = time.monotonic()
    for start in range(0, len(events), batch_size):
        if rate:
            # Paced: batch k leaves no earlier than k * batch_size / rate seconds after the start.
            due = started + start / rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
        batch = events[start:start + batch_size]
        if is_live:
            now = int(time.time() * 1_000_000)
            batch = [live(e, now) for e in batch]
        sender.send_batch(batch, report)
    report.seconds = time.monotonic() - started
    return report
