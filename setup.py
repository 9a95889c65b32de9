"""rcic: RxRx1 / RCIC training as a chain of time-budgeted, exactly resumable stages."""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("rcic/__init__.py").read_text()).group(1)

setup(
    name="rcic",
    version=version,
    description="Recursion Cellular Image Classification toolkit: budgeted Kaggle stages, "
                "exact resume, offline submissions",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    # Python 3.11 is the oldest tried (3.10 reached its end of life in October 2026).
    python_requires=">=3.11",
    packages=find_packages(include=["rcic", "rcic.*"]),
    # The kernel scripts are templates that `rcic-chain init` renders (rcic/kernels -> kernels/).
    package_data={"rcic": ["kernels/*.py", "kernels/*.json"]},
    # Lower bounds only, each one tried (constraints/lowest.txt) or, for torch, derived from
    # the APIs rcic calls; README's "Versions" section has the commands. No upper bounds:
    # Kaggle's image brings its own torch, torchvision, albumentations, pandas and tqdm, and
    # installing rcic must never replace them.
    install_requires=[
        "torch>=2.3",              # torch.amp.GradScaler("cuda") arrived in 2.3
        "torchvision>=0.18",       # the torchvision of torch 2.3
        "efficientnet-pytorch>=0.7.1",
        "albumentations>=1.4.21",  # Compose.set_random_state
        "opencv-python-headless>=4.9.0.80",
        "numpy>=1.24.4",
        "pandas>=1.5.3",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.6.3",
        "PyYAML>=6.0.1",
    ],
    extras_require={
        # The kaggle client is only needed by `rcic-chain push/status/submit/output`; 2.2.5 is
        # the first with every call rcic makes and that reads the version it is asked for
        # (constraints/kaggle-floor.txt, which CI's floor environment installs). kaggle 2.2.x
        # imports six without declaring it.
        "kaggle": ["kaggle>=2.2.5,<3", "six"],
        "timm": ["timm>=0.9"],
        # pytest-xdist: the suite runs on two workers (`pytest -n 2`), one a core.
        "test": ["pytest>=7", "pytest-xdist>=3.2", "kaggle>=2.2.5,<3", "six"],
    },
    entry_points={
        "console_scripts": [
            "rcic-synth=rcic.cli.synth:main",
            "rcic-cache=rcic.cli.cache:main",
            "rcic-data=rcic.cli.data:main",
            "rcic-stage=rcic.cli.stage:main",
            "rcic-predict=rcic.cli.predict:main",
            "rcic-submission=rcic.cli.submission:main",
            "rcic-chain=rcic.cli.chain:main",
        ]
    },
)
