import pytest
import torch

from rcic.errors import UserError
from rcic.tta import VIEWS, views


def asymmetric_batch(dtype=torch.uint8):
    # Distinct values everywhere: no symmetry of the square maps this image onto itself.
    x = torch.arange(2 * 6 * 5 * 5).reshape(2, 6, 5, 5)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_view_moves_pixels_only(dtype):
    x = asymmetric_batch(dtype)
    for view in VIEWS:
        y = view.apply(x)
        assert y.dtype == dtype and y.shape == x.shape
        # exact: the same values per image and channel, only moved (no interpolation)
        assert torch.equal(y.flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values), view.name


def test_the_eight_views_are_distinct():
    x = asymmetric_batch()
    images = [view.apply(x) for view in VIEWS]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not torch.equal(images[i], images[j]), (VIEWS[i].name, VIEWS[j].name)


def test_views_match_their_names():
    x = asymmetric_batch()
    by_name = {v.name: v.apply(x) for v in VIEWS}
    assert torch.equal(by_name["identity"], x)
    assert torch.equal(by_name["hflip"], x.flip(-1))
    assert torch.equal(by_name["vflip"], x.flip(-2))
    assert torch.equal(by_name["rot180"], x.flip(-1).flip(-2))
    assert torch.equal(by_name["transpose"], x.transpose(-1, -2))
    assert torch.equal(by_name["antitranspose"], x.flip(-1).flip(-2).transpose(-1, -2))
    # a quarter turn four times is the identity, and rot270 undoes rot90
    assert torch.equal(by_name["rot90"], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(VIEWS[5].apply(by_name["rot90"]), x)


def test_views_prefixes_and_bounds():
    assert [v.name for v in views(1)] == ["identity"]
    assert len(views(8)) == 8
    for bad in (0, 9):
        with pytest.raises(UserError, match="--tta"):
            views(bad)
