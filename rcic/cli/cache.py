"""rcic-cache: decode every site of an RxRx1 folder once into a uint8 cache at one size."""
import sys
from pathlib import Path

from rcic.cli.common import ArgumentParser, open_data
from rcic.data.cache import FORMATS, build_cache
from rcic.errors import UserError, cli_main


def run(argv):
    parser = ArgumentParser(prog="rcic-cache", description=__doc__)
    parser.add_argument("--data", type=Path,
                        help="RxRx1 folder (default: the embedded synthetic data)")
    parser.add_argument("--out", type=Path, required=True, help="cache folder to build or resume")
    parser.add_argument("--size", type=int, required=True, help="image side in pixels")
    parser.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
    parser.add_argument("--format", choices=FORMATS, default="raw",
                        help="raw: memory-mapped uint8, fastest reads; zlib: about half the "
                             "bytes (fits Kaggle's 20 GB output at 256 px)")
    parser.add_argument("--from", dest="source", type=Path,
                        help="copy the sites from this cache of the same data and size instead "
                             "of decoding PNGs (e.g. a zlib cache into a raw one on local disk)")
    parser.add_argument("--split", choices=["train", "test"],
                        help="cache only these sites (default: train and test)")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be 1 or more")
    data = open_data(args.data)
    out = build_cache(data, args.out, args.size, workers=args.workers, format=args.format,
                      source=args.source, split=args.split)
    print(f"rcic-cache: {args.split or 'train and test'} sites at {args.size} px ({args.format})"
          f" in {out}", file=sys.stderr)


def main(argv=None):
    return cli_main("rcic-cache", run, argv)


if __name__ == "__main__":
    sys.exit(main())
