"""Pieces every console script shares: the data folder default and logging to a file."""
import argparse
import logging
import sys
from pathlib import Path

from rcic.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UserError: one line, exit 2, like every other error."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def open_data(path, check_images=True):
    """The RxRx1 folder the user named, or the embedded synthetic one when none."""
    from rcic.data.layout import RxRx1   # pandas: not for commands that only check their input
    if path is None:
        from rcic.data.synthetic import default_data_dir
        path = default_data_dir()
    return RxRx1(path, check_images=check_images)


def setup_logging(log_file=None, quiet=False):
    logger = logging.getLogger("rcic")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("rcic: %(message)s"))
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
