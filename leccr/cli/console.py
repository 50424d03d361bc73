"""Console logging of one `leccr` command: leccr's own messages at INFO, other libraries' errors only."""

from __future__ import annotations

import logging
import os
import sys

from leccr.cli.common import PROJECT

# Library loggers whose records (even errors) stay out of the console without -v: their failures
# reach the user as the exception `main` reports in one line.
_CHATTY = ("prefect", "httpx", "httpcore", "uvicorn", "fastapi", "docket", "asyncio")


_OWN_CODE = (str(PROJECT / "leccr") + os.sep,)


class _OwnMessages(logging.Filter):
    """Without -v the console shows what leccr's own code logs at INFO and above: stage start and end,
    progress with items/s and ETA, summaries — including what stages log through Prefect's run
    logger, so the record's source file decides, not the logger name. Other libraries: errors only,
    and none from the orchestration stack (Prefect's task-state lines and retries, HTTP requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(_OWN_CODE):
            return record.levelno >= logging.INFO
        return record.levelno >= logging.ERROR and not record.name.startswith(_CHATTY)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now: a rich progress bar swaps it to print lines above the bar.

    (Public name on purpose: Prefect keeps a root handler as the user's only if its class name does
    not start with "_"; otherwise it replaces it with its own console handler.)"""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(verbose: bool) -> None:
    """Console logging for one `leccr` command (see _OwnMessages); -v: everything, with logger names."""
    handler = ConsoleHandler()
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:  # main() called again
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("leccr").setLevel(logging.DEBUG)
        _transformers_progress_bars(True)
        return
    handler.setFormatter(_ConsoleFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_OwnMessages())
    logging.captureWarnings(True)  # library warnings (py.warnings) go through the filter too
    # Read by transformers / huggingface_hub at import: no loading bars, no advice lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _transformers_progress_bars(False)
    # The temporary Prefect server is a subprocess writing to our stderr (not through these handlers).
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


def _transformers_progress_bars(shown: bool) -> None:
    """Where transformers was imported before this command (a notebook, a test session), the variables
    above came too late: its "Loading weights" bars, drawn on stderr from the stages' threads, would cut
    into the console's lines. Importing it here just for this would cost a second, so only then."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as transformers_logging

    if shown:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
