"""What the benchmarks measure of a command's whole process tree, read from /proc: its memory
(PSS, so pages the loader workers share with the main process count once) and its CPU time.
The tree is the one rcic's deadline supervisor kills (`rcic.deadline.tree`): the command, the
stage its supervisor starts, loader workers, torchrun's ranks."""
import os
from pathlib import Path

from rcic.deadline import tree


def tree_pss(root):
    """Summed proportional set size of `root` and the processes below it, in bytes."""
    total = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass            # it ended while we looked
    return total


def tree_cpu(root):
    """CPU seconds used so far by `root` and the processes below it (those alive, and those
    they have reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / tick   # utime stime cutime cstime
    return total
