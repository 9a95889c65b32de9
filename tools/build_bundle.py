"""Build the Kaggle dataset folder that carries rcic offline (see rcic/kaggle/bundle.py).

    python tools/build_bundle.py --owner USER [--out bundle]
    rcic-chain publish-bundle bundle        # kaggle datasets create, or version when it exists
"""
import argparse
import sys
from pathlib import Path

from rcic.errors import cli_main
from rcic.kaggle.bundle import build_bundle

PROJECT = Path(__file__).resolve().parent.parent


def run(argv):
    parser = argparse.ArgumentParser(prog="build_bundle.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--owner", required=True, help="your Kaggle user name")
    parser.add_argument("--out", default=str(PROJECT / "bundle"), help="bundle folder to write")
    parser.add_argument("--project", default=str(PROJECT), help="the rcic source folder")
    args = parser.parse_args(argv)
    for wheel in build_bundle(args.out, args.owner, args.project):
        print(f"{wheel.name}  ({wheel.stat().st_size / 1024:.0f} KiB)")
    print(f"bundle ready in {args.out}: publish it with rcic-chain publish-bundle {args.out}")


if __name__ == "__main__":
    sys.exit(cli_main("build_bundle.py", run))
