"""python -m exporter build --model DIR [--profile cpu] [--name default] [--debug]
python -m exporter plan --model DIR [--profile cuda-24gb]

Any failure, at any step, ends the command with exit status 2 and ONE line on stderr,
`make engine failed: <what went wrong and what to do>`; the Python traceback only with --debug.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from exporter.checkpoint import CheckpointError
from exporter.profiles import ProfileError

FAILED = "make engine failed: "


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is written for the user (it names the problem and the remedy)."""
    from exporter.build import BuildError
    from exporter.decoder import DecoderExportError
    from exporter.parity import ParityError
    from exporter.rope import MRopeError
    from exporter.vision import VisionExportError
    return CheckpointError, ProfileError, BuildError, MRopeError, VisionExportError, DecoderExportError, ParityError


def one_line(e: BaseException, expected: tuple[type[BaseException], ...]) -> str:
    """The failure as a single line: the message, or for an unexpected error its type, message
    and how to see more."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; nothing was written (a previous engine of that name is unchanged)"
    if isinstance(e, MemoryError):
        return ("out of memory while building; free memory or build on a larger machine "
                "(nothing was written)")
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, expected):
        return text
    return (f"{type(e).__name__}: {text} (unexpected: nothing was written; rerun with --debug for "
            "the traceback and report it with the checkpoint's config.json)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter",
                                 description="Compile a Qwen3-VL checkpoint into an engine directory.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build build/engines/<name>/ from a checkpoint directory")
    b.add_argument("--model", type=Path, default=Path("build/models/default"),
                   help="Qwen3-VL checkpoint directory (Hugging Face layout)")
    b.add_argument("--profile", default="cpu", help="build profile name (build/profiles/) or YAML path")
    b.add_argument("--name", default="default", help="engine name: build/engines/<name>/")
    b.add_argument("--out-root", type=Path, default=None, help="where engines are written")
    b.add_argument("--no-parity", action="store_true", help="skip the parity gate (not recommended)")
    p = sub.add_parser("plan", help="print the memory plan for a checkpoint config and a profile")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--profile", default="cuda-24gb")
    for sp in (b, p):
        sp.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    args = ap.parse_args(argv)

    try:
        from exporter.build import ENGINES, build_engine, plan_engine
        if args.cmd == "plan":
            plan, _ = plan_engine(args.model, args.profile)
            print(plan.table())
            return 0
        out = build_engine(args.model, args.profile, args.name, args.out_root or ENGINES,
                           run_parity=not args.no_parity)
        print(f"engine written to {out}")
        return 0
    except (Exception, KeyboardInterrupt) as e:
        if args.debug:
            traceback.print_exc()
        try:
            expected = _expected_errors()
        except Exception:  # the exporter's own modules do not import (a broken environment)
            expected = (CheckpointError, ProfileError)
        print(FAILED + one_line(e, expected), file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 2


if __name__ == "__main__":
    sys.exit(main())
