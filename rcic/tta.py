"""Test-time augmentation: the 8 symmetries of a square (flips and quarter turns).

A microscope field has no "up": every one of these views is an equally valid image of the same
well, so averaging a model's predictions over them removes orientation noise for free.
The views act on the last two dimensions of a batch (B, C, H, W) on its own device, whatever
its dtype (uint8 before normalisation or float after), and are exact: no interpolation.

`views(n)` gives the first n in an order where every prefix is useful on its own:
2 = identity + horizontal flip, 4 = the flips and the half turn, 8 = the whole group.
"""
from dataclasses import dataclass

import torch

from rcic.errors import UserError

H, W = -2, -1   # image dimensions of a (..., H, W) tensor


@dataclass(frozen=True)
class View:
    """Mirror left-right (if `flip`), then turn `turns` quarter turns counter-clockwise."""
    name: str
    flip: bool
    turns: int

    def apply(self, x):
        if self.flip:
            x = torch.flip(x, dims=(W,))
        return torch.rot90(x, self.turns, dims=(H, W)) if self.turns else x


VIEWS = (
    View("identity", False, 0),
    View("hflip", True, 0),
    View("vflip", True, 2),        # mirror left-right then half turn = mirror top-bottom
    View("rot180", False, 2),
    View("rot90", False, 1),
    View("rot270", False, 3),
    View("transpose", True, 1),    # mirror in the main diagonal
    View("antitranspose", True, 3),
)


def views(n):
    """The first n views (1 = no TTA)."""
    if not 1 <= n <= len(VIEWS):
        raise UserError(f"--tta {n}: choose a number of views from 1 (none) to {len(VIEWS)}")
    return VIEWS[:n]
