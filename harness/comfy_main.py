"""Start ComfyUI's own main.py, unmodified, and record the pack's log records on the side.

    python harness/comfy_main.py RECORDS.jsonl /path/to/ComfyUI/main.py [ComfyUI arguments]

Standard library only; run by path (``harness.host.ComfyServer`` does), never imported into the server. It adds one
logging handler to the logger the pack logs with ("LinFusion", children included) that appends each record as a
JSON line (logger name, level, time, message) to RECORDS.jsonl, then runs main.py as ``__main__`` with
``sys.argv`` and ``sys.path[0]`` exactly as ``python main.py ...`` would have them. The console log keeps whatever
format the host's ComfyUI gives it (plain in 0.3.x, ``[LEVEL]``-prefixed and coloured in newer versions); the
records file does not depend on it.
"""
import json
import logging
import os
import runpy
import sys

PACK_LOGGER = "LinFusion"


class _RecordTap(logging.Handler):
    def __init__(self, path: str):
        super().__init__(level=logging.NOTSET)
        self._file = open(path, "a", buffering=1, encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"name": record.name, "level": record.levelname, "levelno": record.levelno,
                               "created": record.created, "message": record.getMessage()})
            self._file.write(line + "\n")  # handle() holds the handler's lock
        except Exception:
            self.handleError(record)


def main() -> None:
    records, main_py, *args = sys.argv[1:]
    logging.getLogger(PACK_LOGGER).addHandler(_RecordTap(records))
    main_py = os.path.abspath(main_py)
    sys.argv = [main_py, *args]
    sys.path[0] = os.path.dirname(main_py)  # what `python main.py` puts first (this folder must not be there)
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
