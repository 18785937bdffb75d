"""The peer workers' wire: one JSON object per line on stdin, one JSON answer per line on stdout.
Imported as a sibling module by llama_worker.py and genai_worker.py (each runs as a script, in
its own environment); nothing else of the project is imported there."""
from __future__ import annotations

import json
import sys


def serve(handlers: dict) -> None:
    """Answer each {"cmd": name, ...} with handlers[name](**rest); an exception becomes
    {"error": ...} so the parent reports it instead of hanging."""
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg.pop("cmd")
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd!r}")
            out = handlers[cmd](**msg)
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
