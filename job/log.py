"""structlog set-up: readable lines on a terminal, JSON lines in containers and pipes."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "auto") -> None:
    """Route structlog to stderr; `fmt` is the spec's log.format (auto, json or console)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if use_console
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # A traceback is for our bugs: JSON lines carry it as text; the console renderer prints its own.
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "job") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
