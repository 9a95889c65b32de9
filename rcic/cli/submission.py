"""rcic-submission check FILE: validate a submission.csv the way Kaggle will score it."""

from rcic.cli.common import ArgumentParser
from rcic.errors import cli_main
from rcic.submission import check_submission


def run(argv):
    p = ArgumentParser(prog="rcic-submission", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check every test id once, integer siRNAs 0..1107")
    check.add_argument("file", help="the submission CSV (id_code,sirna)")
    check.add_argument("--data", help="RxRx1 folder with test.csv and sample_submission.csv "
                                      "(default: the embedded synthetic data)")
    args = p.parse_args(argv)
    if args.data is None:
        from rcic.data.synthetic import default_data_dir
        args.data = default_data_dir()
    rows = check_submission(args.file, args.data)
    print(f"{args.file}: OK ({rows} rows, every test id of {args.data} once)")


def main(argv=None):
    return cli_main("rcic-submission", run, argv)
