"""The bundle installs with no package index, into an environment shaped like Kaggle's image.

Kaggle's image has torch, torchvision, albumentations, pandas, opencv... but neither rcic nor
efficientnet-pytorch. The stand-in image here is this test environment's site-packages seen
through symlinks, minus rcic and efficientnet-pytorch; a fresh venv sees it through a .pth file.
Installing must then take rcic and efficientnet-pytorch from the bundle, and nothing else.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from rcic.kaggle.bundle import build_bundle

REPO = Path(__file__).resolve().parent.parent
NOT_ON_KAGGLE = ("rcic", "__editable__", "efficientnet")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "rcic-package"
    wheels = build_bundle(out, "jdoe", REPO)
    return out, wheels


def package_folders():
    """This environment's site-packages, then the folders its .pth files add (a venv that
    shares another one's torch, as CI's second environment does, sees it through one)."""
    site = Path(sysconfig.get_paths()["purelib"])
    added = [Path(line.strip()) for pth in sorted(site.glob("*.pth"))
             for line in pth.read_text().splitlines()
             if line.strip() and not line.startswith(("import", "#"))]
    return [site] + [folder for folder in added if folder.is_dir() and folder != REPO]


def kaggle_like_venv(root):
    """A fresh venv that sees this environment's packages except rcic and efficientnet."""
    image = root / "image-site"
    image.mkdir()
    for folder in package_folders():
        for entry in folder.iterdir():
            link = image / entry.name
            if not entry.name.lower().startswith(NOT_ON_KAGGLE) and not link.exists():
                link.symlink_to(entry)
    venv = root / "venv"
    # --without-pip: pip and setuptools come from the image too, as on Kaggle (a venv's own
    # older setuptools would shadow the image's and leave torch's requirement unmet).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "kaggle-image.pth").write_text(f"{image}\n")
    return venv


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_bundle_is_flat_and_holds_only_what_kaggle_lacks(built):
    out, wheels = built
    names = sorted(p.name for p in out.iterdir())
    assert all((out / n).is_file() for n in names)       # only the top level is uploaded
    assert [w.name.split("-")[0] for w in wheels] == ["efficientnet_pytorch", "rcic"]
    assert not any(n.startswith(("torch", "torchvision")) for n in names)
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "jdoe/rcic-package"


def test_offline_install_into_a_kaggle_like_environment(built, tmp_path):
    out, _ = built
    venv = kaggle_like_venv(tmp_path)
    env = clean_env()
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index",
                             "--find-links", str(out), "rcic"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    own_site = next((venv / "lib").glob("python*/site-packages"))
    installed = sorted(p.name.split("-")[0].lower() for p in own_site.glob("*.dist-info"))
    # rcic and efficientnet came from the bundle; torch and the rest stayed the image's own.
    assert "rcic" in installed and "efficientnet_pytorch" in installed
    assert not any(name.startswith("torch") for name in installed), installed
    # cwd outside the checkout: `python -c` puts the working folder first on sys.path.
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import rcic, efficientnet_pytorch, torch; print(rcic.__file__)"],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(own_site))
    for script in ("rcic-chain", "rcic-stage", "rcic-predict"):
        result = subprocess.run([str(venv / "bin" / script), "--help"], env=env,
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0 and "usage" in result.stdout, (script, result.stderr)


def test_rendered_kernel_installs_the_bundle_it_finds_in_its_input(built, tmp_path):
    """The stage kernel's own bootstrap: search the input for the wheels, install offline."""
    from rcic.cli.chain import main

    out, _ = built
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\n")
    assert main(["init", "--owner", "jdoe", "--prefix", "rcic-b0", "--stages", "1",
                 "--config", str(recipe), "--out", str(tmp_path / "chain")]) == 0
    venv = kaggle_like_venv(tmp_path)
    inputs = tmp_path / "input" / "datasets" / "jdoe"
    inputs.mkdir(parents=True)
    (inputs / "rcic-package").symlink_to(out, target_is_directory=True)
    env = dict(clean_env(), RCIC_KAGGLE_INPUT=str(tmp_path / "input"),
               RCIC_KAGGLE_WORKING=str(tmp_path))
    result = subprocess.run([str(venv / "bin" / "python"),
                             str(tmp_path / "chain" / "stage-01" / "stage_kernel.py")],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    # Installed and imported rcic from the bundle, then stopped: no competition data attached.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no RxRx1 data (train.csv and test.csv) under" in result.stderr
    own_site = next((venv / "lib").glob("python*/site-packages"))
    assert list(own_site.glob("rcic-*.dist-info")) and list(own_site.glob("efficientnet*"))
