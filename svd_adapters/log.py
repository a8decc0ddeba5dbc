"""One log format for every svdserve program (service, trainer, benchmarks)."""
from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_configured = False


def get_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        logging.basicConfig(level=os.environ.get("SVDSERVE_LOG_LEVEL", "INFO"), format=LOG_FORMAT)
        _configured = True
    return logging.getLogger(name)
