"""python -m exporter build --model DIR [--profile cpu] [--name default]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporter.checkpoint import CheckpointError
from exporter.profiles import ProfileError


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
    args = ap.parse_args(argv)

    from exporter.build import ENGINES, BuildError, build_engine
    try:
        if args.cmd == "plan":
            from exporter.build import plan_engine
            plan, _ = plan_engine(args.model, args.profile)
            print(plan.table())
            return 0
        out = build_engine(args.model, args.profile, args.name, args.out_root or ENGINES,
                           run_parity=not args.no_parity)
        print(f"engine written to {out}")
        return 0
    except (CheckpointError, ProfileError, BuildError) as e:
        print(f"make engine failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
