"""Keep presigned URLs' signatures out of log lines (httpx logs every request URL at INFO)."""

from __future__ import annotations

import logging
import re

_SECRET_PARAM = re.compile(
    r"((?:sig|X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature)=)[^&\s\"']+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1REDACTED", text)


class RedactSignatures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(redact(str(a)) if "=" in str(a) else a for a in args)
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact(record.msg)
        return True


def install() -> None:
    """Idempotent: add the filter to the loggers that print request URLs."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSignatures) for f in logger.filters):
            logger.addFilter(RedactSignatures())
