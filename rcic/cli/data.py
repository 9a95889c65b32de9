"""rcic-data: check every file of an RxRx1 folder, or write the manifest to check a copy against.

  rcic-data verify --data DIR                  decode every image: lists every missing, empty,
                                               truncated, undecodable, wrong-size or
                                               wrong-depth one; exit 2 if any
  rcic-data verify --data COPY --manifest M    also finds files that decode but differ from
                                               the folder M was made of
  rcic-data manifest --data DIR --out M.csv    size and CRC-32 of every file (after the decode
                                               check)
"""
import argparse
import sys
from pathlib import Path

from rcic.cli.common import ArgumentParser, open_data
from rcic.errors import UserError, cli_main

DEFAULT_REPORT = "rcic-data-verify.csv"


def run(argv):
    parser = ArgumentParser(prog="rcic-data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("verify", help="list every damaged file of a data folder")
    make = commands.add_parser("manifest", help="write the manifest of a whole data folder")
    for sub in (check, make):
        sub.add_argument("--data", type=Path,
                         help="RxRx1 folder (default: the embedded synthetic data)")
        sub.add_argument("--workers", type=int, help="threads reading files (default: all cores)")
        sub.add_argument("--quiet", action="store_true", help="no progress")
    check.add_argument("--manifest", type=Path,
                       help="a manifest (rcic-data manifest) of the original: also find files "
                            "that decode but differ from it")
    check.add_argument("--report", type=Path, default=Path(DEFAULT_REPORT),
                       help=f"CSV of the damaged files (file, problem, detail); written on "
                            f"every run (default: {DEFAULT_REPORT})")
    make.add_argument("--out", type=Path, required=True, help="the manifest CSV to write")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be 1 or more")
    if args.command == "verify" and not args.report.resolve().parent.is_dir():
        raise UserError(f"the folder of --report {args.report} does not exist: create it first")

    from rcic.data import verify     # pandas and OpenCV: not for --help or a bad argument
    data = open_data(args.data, check_images=False)   # every image is read below
    if args.command == "manifest":
        problems = verify.make_manifest(data, args.out, args.workers, not args.quiet)
        if len(problems):
            print("\n".join(verify.table(problems)))
            raise UserError(f"{len(problems)} damaged file(s) in {data.root} (listed above): "
                            f"{verify.FROM_KAGGLE}; a manifest vouches only for a whole "
                            f"folder, so none was written")
        print(f"rcic-data: manifest of {data.root} in {args.out}", file=sys.stderr)
        return 0
    problems = verify.verify(data, args.manifest, args.workers, not args.quiet)
    if len(problems):
        print("\n".join(verify.table(problems)))      # first: a report that fails loses nothing
    verify.write_report(problems, args.report)
    check_kind = "manifest check" if args.manifest else "decode check"
    if len(problems):
        raise UserError(f"{len(problems)} damaged file(s) in {data.root} (listed above and in "
                        f"{args.report}): {verify.FROM_KAGGLE}, then rerun rcic-data verify")
    print(f"rcic-data: every file of {data.root} is whole ({check_kind})", file=sys.stderr)
    return 0


def main(argv=None):
    return cli_main("rcic-data", run, argv)


if __name__ == "__main__":
    sys.exit(main())
