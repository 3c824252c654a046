"""`graft-static`: carry what a grafted run found over to plain optimizers.

graft-static derive RUN_DIR [--window START:END] [--reduce median|mean] [--scale S] [--out PATH]
    per-parameter static multipliers from an M#D run's logged norms (default
    RUN_DIR/multipliers.json), each times S (default 1); train with them: graft=off static=PATH
"""

from __future__ import annotations

import argparse
from pathlib import Path

from graft.common.cli_parser import Parser
from graft.common.errors import UserError, exit_with
from graft.train.recorded import load_recorded
from graft.transfer.static import REDUCTIONS, derive, parse_window, scaled, write_multipliers


def run_derive(args: argparse.Namespace) -> None:
    recorded = load_recorded(args.run_dir)
    window = parse_window(args.window, recorded)
    content = scaled(derive(recorded, window, args.reduce), args.scale)
    out = args.out or args.run_dir / "multipliers.json"
    write_multipliers(out, content)
    values = sorted(content["multipliers"].values())
    print(
        f"{out}: {len(values)} multipliers from {content['magnitude']}#{content['direction']} "
        f"steps {window[0]}..{window[1]} ({content['steps_used']} logged, {args.reduce}"
        f"{'' if args.scale == 1 else f', times {args.scale:g}'}); "
        f"range {values[0]:.3g}..{values[-1]:.3g}, median {values[len(values) // 2]:.3g}\n"
        f"train with the source run's task, schedule and settings, plus: graft=off "
        f"static={out} optim@magnitude={content['direction']} "
        f"magnitude.lr={content['direction_lr']:g}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="graft-static", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    derive_parser = commands.add_parser(
        "derive", help="per-parameter static lr multipliers from a grafted run's norms"
    )
    derive_parser.add_argument("run_dir", type=Path, help="a graft-train run of M#D")
    derive_parser.add_argument(
        "--window", help="START:END steps to reduce over (default: after the warmup)"
    )
    derive_parser.add_argument("--reduce", default="median", choices=REDUCTIONS)
    derive_parser.add_argument(
        "--scale", type=float, default=1.0, help="times every multiplier (default 1)"
    )
    derive_parser.add_argument("--out", type=Path, help="default: RUN_DIR/multipliers.json")
    derive_parser.set_defaults(run=run_derive)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        exit_with("graft-static", error)


if __name__ == "__main__":
    main()
