"""Do the tests catch a broken stage? Run them against a mutation and list what failed.

    python tools/mutation_check.py budget-always-fits [TEST_FILE ...]

A mutation is one of tests/programs/patched/sitecustomize.py's (for example
`budget-always-fits`: the stage's own budget check says yes to everything, so only the
supervisor's kill at the deadline stops a stage). It is applied in every Python process the
tests start, the pytest process included. A test file that runs a budgeted stage must then have
a failing test: otherwise it would pass with the stage's own stop broken.

Prints one line per test file (the tests that failed, or "NOTHING FAILED") and exits 1 when a
file caught nothing. The default files are those that run a stage under a budget.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETED = ["tests/test_stage.py", "tests/test_stage_deadline.py", "tests/test_ddp.py",
            "tests/test_faults.py", "tests/test_budget.py"]
# tests/test_cuda.py runs budgeted stages too, on a GPU only (its tests skip on a CPU).


def failures(junit):
    """{test file: [failed test names]} from a JUnit XML report."""
    failed = defaultdict(list)
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
            failed[Path(path).name].append(case.get("name"))
    return failed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mutation", help="a mutation of tests/programs/patched/sitecustomize.py")
    p.add_argument("files", nargs="*", default=BUDGETED, help="test files (default: %(default)s)")
    p.add_argument("--workers", default="2", help="pytest-xdist workers (default 2)")
    args = p.parse_args()
    patched = ROOT / "tests" / "programs" / "patched"
    env = dict(os.environ, RCIC_TEST_PATCHES=args.mutation,
               PYTHONPATH=os.pathsep.join(filter(None, [str(patched), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", args.workers, "-p",
                        "no:cacheprovider", f"--junitxml={junit}", *args.files],
                       cwd=ROOT, env=env)
        failed = failures(junit)
    print(f"\nmutation {args.mutation}:")
    caught_nothing = []
    for file in args.files:
        name = Path(file).name
        if failed.get(name):
            print(f"  {name}: {len(failed[name])} failed: {', '.join(sorted(failed[name]))}")
        else:
            print(f"  {name}: NOTHING FAILED")
            caught_nothing.append(name)
    return 1 if caught_nothing else 0


if __name__ == "__main__":
    sys.exit(main())
