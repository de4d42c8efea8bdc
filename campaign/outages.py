"""Clean stops when a campaign's location goes out of service (its disk full, its object
store unreachable, its bucket gone): a watchdog in the driver stops Tune within a bounded
time, and the command line says the cause in one line with the resume command, instead of
minutes of retries and Tune's tracebacks. The commit markers make the stop lossless."""
from __future__ import annotations

import logging
import re
import time
import traceback
from pathlib import Path

from trainables import storage

PROBE_ATTEMPTS = 3  # probes of the location before a suspected outage counts as one
PROBE_PAUSE_S = 2.0  # between those probes: a transient error gets this long to clear
PROBE_EVERY_S = 15.0  # the watchdog also checks the location this often while trials run
FAILURES_IN_A_ROW = 3  # trial attempts failing on the location, no commit between: an outage even if the driver's probe passes
EXIT_CODE = 75  # EX_TEMPFAIL: try again later (python -m campaign resume)
LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "")  # whose handlers see Tune's error reports


class StorageOutage(Exception):
    """Raised by the watchdog (campaign.runner.OutageWatch) inside Tune's loop: ``cause`` is the one line."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class CampaignOutage(Exception):
    """A campaign stopped because its location went out of service; resume it once it is back."""

    def __init__(self, directory, cause: str) -> None:
        super().__init__(cause)
        self.directory, self.cause = directory, cause

    def line(self) -> str:
        return (f"stopped: {self.cause}; once that is fixed, run `python -m campaign resume {self.directory}` "
                "to finish the campaign (nothing committed is lost)")


def confirm(directory) -> str | None:
    """The location's outage, in one line, if PROBE_ATTEMPTS probes PROBE_PAUSE_S apart all
    fail; None as soon as one passes (the error was transient)."""
    cause = None
    for attempt in range(PROBE_ATTEMPTS):
        if attempt:
            time.sleep(PROBE_PAUSE_S)
        cause = storage.probe_outage(directory)
        if cause is None:
            return None
    return cause


def error_text(path: str | None) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except (OSError, TypeError):
        return ""


def os_reason(text: str) -> str | None:
    """'No space left on device' from an error text holding '[Errno 28] No space left on device: ...'."""
    m = re.search(r"\[Errno \d+\] ([^:'\n]+)", text)
    return m.group(1).strip() if m else None


class LogQuieter(logging.Filter):
    """Drops Ray's and Tune's reports of errors caused by the campaign location's outage
    (trial failures with their tracebacks, failed experiment-state syncs, and Ray's
    'Unhandled error' of a failed trial nobody waited for, even after the run), and all of
    them while the watchdog stops the campaign; a dropped sync failure makes it probe."""

    def __init__(self, watch) -> None:
        super().__init__()
        self.watch = watch
        self.retired = False  # after the run: only reports of the outage are dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("ray"):
            return True
        if self.watch.cause is not None and not self.retired:
            return False
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        if storage.outage(self.watch.directory, text) is None:
            return True
        if not self.retired and "Trial task failed" not in text:
            self.watch.suspected = True  # Tune's own write: probe at the next step
        return False


def quiet(watch) -> list:
    """Install a LogQuieter on the handlers that print Ray's and Tune's logs; returns what
    ``unquiet`` removes."""
    quieter = LogQuieter(watch)
    handlers = {h for name in LOGGERS for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(quieter)
    return [(handler, quieter) for handler in handlers]


def unquiet(installed: list) -> None:
    """Remove the LogQuieters, or after an outage keep them for its reports alone: Ray
    prints the errors of failed trials nobody waited for when it frees them, later."""
    for handler, quieter in installed:
        if quieter.watch.cause is not None:
            quieter.retired = True
        else:
            handler.removeFilter(quieter)
