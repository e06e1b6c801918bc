"""Progress of long operations: a start line, progress and a one-line summary through ``logging``
(logger "fastlora"), plus a tqdm bar where a terminal or notebook shows one.

fastlora's messages go to the "fastlora" logger, which Python shows only from WARNING up unless the
application configures logging. To see them::

    fastlora.enable_logging()            # INFO and up on stderr
    # or, in an application that configures logging itself:
    logging.getLogger("fastlora").setLevel(logging.INFO)
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["Progress", "enable_logging"]

logger = logging.getLogger("fastlora")

LOG_EVERY_S = 30.0  # a progress line at most this often (and at each tenth of the work)


def enable_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Shows fastlora's messages of ``level`` and up on stderr (adds one handler to the
    "fastlora" logger; calling it again only changes the level) and returns the logger."""
    logger.setLevel(level)
    if not any(getattr(h, "_fastlora", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._fastlora = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


class Progress:
    """Counts the steps of one operation: logs the start, a progress line at each tenth of
    ``total`` (or every 30 s when the total is unknown) and the end with its time; shows a tqdm bar
    when ``bar`` and a terminal or notebook is attached (tqdm decides)."""

    def __init__(self, what: str, total: int | None, bar: bool = True, unit: str = "batches") -> None:
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._bar = None
        if bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=what, disable=None, leave=False, unit=unit)
        logger.info("fastlora: %s: started (%s %s)", what, total if total is not None else "?", unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.perf_counter()
        tenth = self.total and self.total >= 10 and self.done % (self.total // 10) == 0
        if tenth or now - self._last >= LOG_EVERY_S:
            self._last = now
            logger.info("fastlora: %s: %d/%s %s, %.1f s", self.what, self.done,
                        self.total if self.total is not None else "?", self.unit, now - self.start)

    def close(self, summary: str = "") -> float:
        """Closes the bar, logs the end (with ``summary``) and returns the seconds taken."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        took = time.perf_counter() - self.start
        logger.info("fastlora: %s: done, %d %s in %.2f s%s", self.what, self.done, self.unit, took,
                    f"; {summary}" if summary else "")
        return took
