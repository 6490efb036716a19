"""Log lines for people (one line per event) or for log collectors (one JSON object per line).

Either way a line names the series and the job by their UIDs and ids, never the patient: the
node's own messages carry no names, patient IDs or birth dates at any level up to INFO.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` with its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def warning_to_debug_log(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Libraries' warnings (highdicom on a one-part patient name, pydicom on a value outside
    its VR) are for whoever debugs, not for the user's terminal: the node and the CLI say
    what matters in their own lines."""
    logging.getLogger("py.warnings").debug(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )


def configure(level: int, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    warnings.showwarning = warning_to_debug_log


@dataclass(frozen=True)
class LogSettings:
    """How this process logs, to hand to a process it starts (a spawned process begins with
    Python's defaults): the root level, the format and the levels set on named loggers."""

    level: int
    json_lines: bool
    levels: dict[str, int]

    @classmethod
    def current(cls) -> LogSettings:
        root = logging.getLogger()
        named = {
            name: logger.level
            for name, logger in logging.Logger.manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
        }
        json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
        return cls(root.level, json_lines, named)

    def apply(self) -> None:
        configure(self.level, self.json_lines)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
