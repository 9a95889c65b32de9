"""Pieces every console script shares: argument errors as one line, the data folder default."""
import argparse

from rcic.data.layout import RxRx1
from rcic.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UserError: one line, exit 2, like every other error."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def open_data(path, check_images=True):
    """The RxRx1 folder the user named, or the embedded synthetic one when none."""
    if path is None:
        from rcic.data.synthetic import default_data_dir
        path = default_data_dir()
    return RxRx1(path, check_images=check_images)
