"""rcic-chain: a training run as a chain of Kaggle kernels, and a local dry run of the chain.

  init            render N stage kernels and a submission kernel into a folder
  push            push them in order, each after the previous one completed; killed and run
                  again, it continues where Kaggle says the chain stands (each kernel runs once)
  submit          submit the submission kernel's output and wait for the scores
  status          every kernel's state, version and run time, and what the chain costs
  output          download every kernel's outputs and log into DIR/<kernel>/output
  plan            the memory a recipe needs per GPU; with a measured throughput, the stages
  publish-bundle  upload the bundle folder (tools/build_bundle.py) as a Kaggle dataset
  local           run the whole chain on this machine, as Kaggle would
  report          report.html and report.png of one chain or several, side by side

push, submit, status, output and publish-bundle need Kaggle credentials: an API token
(KAGGLE_API_TOKEN or ~/.kaggle/access_token) or the legacy key (~/.kaggle/kaggle.json, or
KAGGLE_USERNAME and KAGGLE_KEY); nothing else does.
"""
import argparse
from pathlib import Path

from rcic.cli.common import ArgumentParser
from rcic.errors import UserError, cli_main
from rcic.kaggle import chain, session

PROG = "rcic-chain"


def whole_number(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")


def positive(unit):
    """An argparse type: a number above 0 of `unit` (e.g. "seconds", "GiB, e.g. 24")."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit} above 0")
        return value
    return parse


seconds = positive("seconds")
gibibytes = positive("GiB")


def duration(text):
    from rcic.budget import parse_duration

    try:
        return parse_duration(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err))


def cmd_init(args):
    from rcic.config import load_recipe
    from rcic.kaggle.plan import refuse_unfitting

    spec = chain.ChainSpec(owner=args.owner, prefix=args.prefix, stages=args.stages,
                           recipe=Path(args.config), budget=args.budget,
                           session_limit=args.session_limit, competition=args.competition,
                           machine_shape=args.machine_shape, bundle=args.bundle,
                           steps_per_stage=args.steps_per_stage, cache_size=args.cache)
    spec.validate()
    refuse_unfitting(load_recipe(spec.recipe), spec.machine_shape)
    folders = chain.render_chain(spec, args.out)
    for folder in folders:
        print(f"{folder}  {chain.kernel_id(folder)}")
    print(f"each stage: a budget of {spec.budget} in a session of at most "
          f"{session.format_duration(spec.limit()[0])} ({spec.limit()[1]})")
    print(f"next: rcic-chain push {args.out}  (after publishing the bundle dataset "
          f"{spec.kernel_id(spec.bundle)})")


def cmd_push(args):
    from rcic.kaggle import client
    from rcic.kaggle.driver import push_chain
    from rcic.kaggle.plan import refuse_unfitting_chain

    chain.kernel_folders(args.dir)        # a broken folder fails before any credentials
    refuse_unfitting_chain(args.dir)      # and a recipe too big for the machine's GPUs
    push_chain(Path(args.dir), client.connect(), args.poll_seconds, retry=args.retry,
               start_from=args.start_from, echo=lambda s: print(s, flush=True))


def cmd_submit(args):
    from rcic.kaggle import client
    from rcic.kaggle.submit import submit_chain

    chain.kernel_folders(args.dir)
    submit_chain(Path(args.dir), client.connect(), args.message, args.poll_seconds,
                 again=args.again, echo=lambda s: print(s, flush=True))


def cmd_status(args):
    from rcic.kaggle import client
    from rcic.kaggle.cost import chain_status

    chain.kernel_folders(args.dir)
    chain_status(Path(args.dir), client.connect())


def cmd_output(args):
    from rcic.kaggle import client
    from rcic.kaggle.record import Record

    folders = chain.kernel_folders(args.dir)
    api, record = client.connect(), Record(args.dir)
    for folder in folders:
        kernel, current = chain.kernel_id(folder), record.current(folder.name)
        # The run this folder pushed last; the newest run for a kernel it never pushed.
        version = current["version"] if current else None
        files = client.download_output(api, kernel, folder / "output", version)
        print(f"{kernel}{f' version {version}' if version else ''}: {len(files)} file(s) in "
              f"{folder / 'output'}")


def cmd_plan(args):
    from rcic.kaggle.plan import memory_plan_lines, plan, samples_per_second_from

    if args.samples_per_second is not None and args.from_stage_json is not None:
        raise UserError("give the throughput with one of --samples-per-second X or "
                        "--from-stage-json FILE, not both")
    recipe, budget = plan_budget(args)
    if args.samples_per_second is not None or args.from_stage_json is not None:
        sps = (args.samples_per_second if args.samples_per_second is not None
               else samples_per_second_from(args.from_stage_json))
        print(plan(recipe, sps, budget, args.train_samples, args.data).describe())
    print("\n".join(memory_plan_lines(recipe, args.gpu_memory, args.machine_shape)))


def plan_budget(args):
    """(recipe, stage budget in seconds) for `plan`: --budget, checked against the session
    limit, or the longest budget that fits it."""
    from rcic.budget import parse_duration
    from rcic.config import load_recipe

    recipe = load_recipe(args.config)
    parameters = session.recipe_parameters(recipe)
    limit, why = session.session_limit(args.machine_shape, args.session_limit)
    if args.budget is None:
        return recipe, session.default_budget_seconds(limit, parameters)
    budget = parse_duration(args.budget)
    session.check_budget(budget, args.budget, limit, why, parameters)
    return recipe, budget


def cmd_publish_bundle(args):
    from rcic.kaggle import client
    from rcic.kaggle.bundle import bundle_ref

    ref = bundle_ref(args.folder)
    api = client.connect()
    print(f"{ref}: {client.publish_dataset(api, args.folder, ref, args.notes)}")


def cmd_local(args):
    from rcic.kaggle.limits import parse_size
    from rcic.kaggle.local import run_local_chain

    out = Path(args.out) if args.out else Path("runs") / "local-chain"
    result = run_local_chain(args.stages, args.budget, out, recipe=args.config, data=args.data,
                             steps_per_stage=args.steps_per_stage, cache_size=args.cache,
                             grace_seconds=args.grace,
                             output_limit=parse_size(args.output_limit))
    print("\n".join(result["table"]))
    print(f"submission: {result['submission']}")
    print(f"report: {result['report']}")


def cmd_report(args):
    from rcic.report import report_folders

    print(f"report: {report_folders([Path(d) for d in args.dirs], Path(args.out))}")


def add_cache_option(parser):
    parser.add_argument("--cache", type=whole_number, default=0, metavar="SIZE",
                        help="add two CPU kernels that decode the train and the test images "
                             "once into zlib caches at SIZE px (the recipe's data.image_size); "
                             "each stage and the submission expand them onto local disk "
                             "(default: only when the recipe sets data.cache)")


def add_session_options(parser):
    parser.add_argument("--budget",
                        help="training budget of each stage (default: the longest that fits "
                             "the session, leaving Kaggle time to boot and save the output: "
                             "11h30m for NvidiaTeslaT4's 12-hour sessions)")
    parser.add_argument("--session-limit", type=duration, metavar="DURATION",
                        help="a competition's own session limit, e.g. 9h (default: Kaggle's, "
                             "12 h for GPU and CPU kernels, 9 h for TPU)")


def build_parser():
    p = ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="render the chain's kernels into a folder")
    s.add_argument("--owner", required=True, help="your Kaggle user name")
    s.add_argument("--prefix", required=True, help="slug prefix of the kernels, e.g. rcic-b0")
    s.add_argument("--stages", type=whole_number, required=True, help="number of stage kernels")
    s.add_argument("--config", required=True, help="recipe YAML file, embedded in each stage")
    s.add_argument("--competition", default=chain.DEFAULT_COMPETITION)
    s.add_argument("--machine-shape", default=chain.DEFAULT_MACHINE_SHAPE,
                   help=f"Kaggle accelerator (default {chain.DEFAULT_MACHINE_SHAPE})")
    add_session_options(s)
    s.add_argument("--bundle", default=chain.DEFAULT_BUNDLE,
                   help=f"slug of your bundle dataset (default {chain.DEFAULT_BUNDLE})")
    s.add_argument("--out", required=True, help="folder to render into (new or empty)")
    s.add_argument("--steps-per-stage", type=whole_number, default=0,
                   help="also stop each stage after N optimizer steps (default 0: budget only)")
    add_cache_option(s)
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("push", help="push the kernels in order, waiting for each; resumable")
    s.add_argument("dir")
    s.add_argument("--poll-seconds", type=seconds, default=60.0,
                   help="seconds between status checks (default 60)")
    s.add_argument("--retry", action="store_true",
                   help="push again a kernel whose recorded run failed or was cancelled")
    s.add_argument("--from", dest="start_from", metavar="KERNEL",
                   help="run again from this kernel folder on, e.g. stage-03, even where it "
                        "completed (once: rerun without --from to continue)")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("submit", help="submit the chain's submission.csv, wait for the scores")
    s.add_argument("dir")
    s.add_argument("-m", "--message", help="the submission's description (default: the "
                                           "kernel and version)")
    s.add_argument("--again", action="store_true",
                   help="submit even though this version of the kernel was submitted before")
    s.add_argument("--poll-seconds", type=seconds, default=60.0,
                   help="seconds between score checks (default 60)")
    s.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "every kernel's state and what the chain "
                                                    "costs against the GPU quota"),
                             ("output", cmd_output, "download outputs into DIR/<kernel>/output")):
        s = sub.add_parser(name, help=text)
        s.add_argument("dir")
        s.set_defaults(func=func)

    s = sub.add_parser("plan", help="the memory a recipe needs per GPU, and with a throughput, "
                                    "the stages it needs")
    s.add_argument("--samples-per-second", type=float, help="measured training throughput")
    s.add_argument("--from-stage-json", help="read samples_per_second from a stage's stage.json")
    s.add_argument("--config", help="recipe YAML file (default: the built-in recipe)")
    s.add_argument("--machine-shape", default=chain.DEFAULT_MACHINE_SHAPE,
                   help=f"Kaggle accelerator (default {chain.DEFAULT_MACHINE_SHAPE})")
    add_session_options(s)
    s.add_argument("--train-samples", type=whole_number,
                   help="training sites per epoch (default: counted in --data)")
    s.add_argument("--data", help="RxRx1 folder to count training sites in (default: embedded)")
    s.add_argument("--gpu-memory", type=gibibytes, metavar="GIB",
                   help="memory of one GPU in GiB (default 15: a T4 of Kaggle's "
                        "NvidiaTeslaT4 machine)")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("publish-bundle", help="upload the bundle as a Kaggle dataset")
    s.add_argument("folder", help="bundle folder written by tools/build_bundle.py")
    s.add_argument("--notes", default="rcic bundle", help="version notes")
    s.set_defaults(func=cmd_publish_bundle)

    s = sub.add_parser("local", help="run the whole chain locally, as Kaggle would")
    s.add_argument("--stages", type=whole_number, required=True)
    s.add_argument("--budget", required=True, help="budget of each stage, e.g. 2m")
    s.add_argument("--config", help="recipe YAML file (default: the built-in recipe)")
    s.add_argument("--data", help="RxRx1 folder (default: the embedded synthetic data)")
    s.add_argument("--out", help="new folder for the run (default runs/local-chain)")
    s.add_argument("--grace", type=float, default=15.0,
                   help="seconds past the budget before a stage is killed (default 15)")
    s.add_argument("--steps-per-stage", type=whole_number, default=0,
                   help="also stop each stage after N optimizer steps (default 0: budget only)")
    s.add_argument("--output-limit", default="20GB",
                   help="fail a kernel that leaves more than this in its working folder, as "
                        "Kaggle drops such output (default 20GB; scale it down for small data)")
    add_cache_option(s)
    s.set_defaults(func=cmd_local)

    s = sub.add_parser("report", help="one picture of a chain, or of several side by side")
    s.add_argument("dirs", nargs="+", metavar="DIR",
                   help="a chain folder: the --out of rcic-chain local, or of rcic-chain init "
                        "(after rcic-chain output)")
    s.add_argument("--out", required=True, help="folder for report.html and report.png")
    s.set_defaults(func=cmd_report)
    return p


def run(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv=None):
    return cli_main(PROG, run, argv)
