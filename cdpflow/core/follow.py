"""Values a long-running job follows while it runs: the segment rules file, the promoted model.

A `Followed` value is re-read at most every `every_s` seconds: a cheap `probe` says what the
source holds now (a file's bytes' hash, a registry pointer), and only when that changed is the
value `load`ed again. What a running stream does with a source that goes wrong is the point:

- a broken edit (a rules file that does not parse, a model whose checksum does not match) keeps
  the last good value, logs why once per change, and counts it in `failures`: a typo in a rules
  file must not stop the stream or empty every segment;
- a source that cannot be read before any value was ever loaded raises, so the engine retries
  the work (nothing is decided without the value rather than decided wrongly).

Both engines use it the same way (the Beam DoFns in `setup`, the Flink functions in `open`):
Beam's periodic side inputs are refused by Prism and do not run on the BundleBased
DirectRunner (docs/versions.md), and a PyFlink job has no Python source to broadcast a file
from, so each worker follows the source itself. Thread-safe: RunInference shares one loaded
model among a worker's threads. Engine-free.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
_UNSET = object()


class Followed(Generic[T]):
    """A value kept in step with its source.

    Args:
      probe: what the source holds now, cheaply (compared with what was loaded last).
      load: the value for a probe's answer.
      every_s: the longest a changed source goes unnoticed.
      what: the source, for log messages.
      initial: a value already loaded, with the probe answer it was loaded from (`initial_key`).
      clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, probe: Callable[[], Any], load: Callable[[Any], T], every_s: float, what: str,
                 initial: Any = _UNSET, initial_key: Any = None, clock: Callable[[], float] = time.monotonic):
        self.probe, self.load, self.every_s, self.what, self.clock = probe, load, float(every_s), what, clock
        self.lock = threading.Lock()
        self.value: Any = initial
        self.key = initial_key
        self.checked_at = clock() if initial is not _UNSET else None
        self.refused: Any = _UNSET
        self.failures = 0
        self.changes = 0

    def get(self) -> T:
        """The current value (re-read first when `every_s` has passed since the last look).

        Raises:
          Exception: whatever `probe` or `load` raised, when no value was ever loaded.
        """
        if self.checked_at is not None and self.clock() - self.checked_at < self.every_s:
            return self.value
        with self.lock:
            if self.checked_at is not None and self.clock() - self.checked_at < self.every_s:
                return self.value  # another thread looked while this one waited
            try:
                key = self.probe()
            except Exception as err:  # noqa: BLE001 (an unreadable source keeps the last good value)
                self._failed(("probe", str(err)), err)
            else:
                # a version refused before is tried again (its read may have failed for a moment);
                # only the log says it once
                if self.value is _UNSET or key != self.key:
                    try:
                        value = self.load(key)
                    except Exception as err:  # noqa: BLE001 (a broken version keeps the last good one)
                        self._failed(key, err)
                    else:
                        self.value, self.key, self.refused = value, key, _UNSET
                        self.changes += 1
            self.checked_at = self.clock()
            return self.value

    def _failed(self, key: Any, err: Exception) -> None:
        if self.value is _UNSET:
            raise err
        self.failures += 1
        if key != self.refused:  # said once per broken version, not at every look
            log.error("%s: %s; keeping the version loaded before", self.what, err)
        self.refused = key


def file_digest(read: Callable[[], bytes]) -> Callable[[], str]:
    """A probe over a small file: the sha256 of its bytes (an edit that keeps the size and the
    modification time within the clock's resolution is still seen)."""
    return lambda: hashlib.sha256(read()).hexdigest()


def local_reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as handle:
            return handle.read()
    return read
