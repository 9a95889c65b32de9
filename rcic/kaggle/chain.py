"""`rcic-chain init`: render a chain of N stage kernels and one submission kernel into a folder.

    DIR/chain.json             the kernels in the order they must run
    DIR/stage-01/              stage_kernel.py + kernel-metadata.json   (GPU, budgeted)
    ...
    DIR/stage-NN/              lists stage NN-1 as kernel_sources: its checkpoint is the input
    DIR/submit/                submit_kernel.py + kernel-metadata.json  (lists stage NN)
With a cache (`--cache SIZE`, or a recipe that sets data.cache), two CPU kernels come first:
    DIR/cache-train/           cache_kernel.py: the train split as a zlib cache (its output)
    DIR/cache-test/            the test split; each fits Kaggle's 20 GB output on its own
and every stage lists cache-train (cache-test too when the recipe reads test images), the
submission kernel cache-test; each expands what it lists onto its local disk.

Kaggle uploads only each kernel's code file, so a kernel's settings (stage number, budget, the
recipe's YAML text) are written into its script, replacing the template's `SETTINGS = ...` line.
"""
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rcic.errors import UserError, refuse_nonempty
from rcic.kaggle import metadata, session

DEFAULT_COMPETITION = "recursion-cellular-image-classification"
DEFAULT_MACHINE_SHAPE = "NvidiaTeslaT4"   # two T4s; P100 images no longer run current torch
DEFAULT_BUNDLE = "rcic-package"           # slug of the bundle dataset (dataset-metadata.json)
CHAIN_FILE = "chain.json"
STAGE_SCRIPT, SUBMIT_SCRIPT, CACHE_SCRIPT = "stage_kernel.py", "submit_kernel.py", "cache_kernel.py"
CACHE_FORMAT = "zlib"      # about half the raw bytes: a split at 256 px fits the 20 GB output
SETTINGS_LINE = re.compile(r"^SETTINGS = .*$", re.MULTILINE)


@dataclass
class ChainSpec:
    owner: str
    prefix: str
    stages: int
    recipe: Path = None            # a recipe YAML file; None = the built-in default recipe
    budget: str = None             # None = the longest that fits the session (rcic.kaggle.session)
    session_limit: float = None    # seconds; None = Kaggle's limit for the machine shape
    competition: str = DEFAULT_COMPETITION
    machine_shape: str = DEFAULT_MACHINE_SHAPE
    bundle: str = DEFAULT_BUNDLE
    steps_per_stage: int = 0       # 0 = train until the budget; N = stop each stage after N steps
    cache_size: int = 0            # px of the cache kernels; 0 = only if the recipe sets data.cache

    def validate(self):
        from rcic.budget import parse_duration
        from rcic.config import load_recipe

        metadata.check_owner(self.owner)
        if not metadata.KAGGLE_NAME_RE.match(self.prefix):
            raise UserError(f"--prefix {self.prefix!r} is not a Kaggle slug: use lowercase "
                            f"letters, digits and hyphens, e.g. --prefix rcic-b0")
        if not 5 <= len(self.prefix) <= 36:
            raise UserError(f"--prefix {self.prefix!r} must have 5 to 36 characters (Kaggle's "
                            f"slugs and titles have 5 to 50, and rcic adds '-stage-NN'), "
                            f"e.g. --prefix rcic-b0")
        if self.steps_per_stage < 0:
            raise UserError(f"--steps-per-stage {self.steps_per_stage}: must be 0 (no limit) "
                            f"or more")
        if self.stages < 1:
            raise UserError(f"--stages {self.stages}: a chain needs at least 1 stage")
        check_slugs(self)
        recipe = load_recipe(self.recipe)    # the built-in default when None
        # Building the model checks it now, not on Kaggle; its size sets the output's save time.
        self.parameters = session.recipe_parameters(recipe)
        size = recipe.data.image_size
        if self.cache_size < 0 or self.cache_size not in (0, size):
            raise UserError(f"--cache {self.cache_size}: the recipe trains at {size} px, and a "
                            f"cache holds the images at the size the model sees: pass "
                            f"--cache {size}, or change data.image_size")
        limit, why = self.limit()
        if self.budget is None:
            self.budget = session.format_duration(
                session.default_budget_seconds(limit, self.parameters))
        session.check_budget(parse_duration(self.budget), self.budget, limit, why,
                             self.parameters)

    def limit(self):
        """(seconds, why) of the session limit of this chain's stages."""
        return session.session_limit(self.machine_shape, self.session_limit)

    def cache_plan(self):
        """(cache px or 0, whether the stages read test images too) of this chain's recipe."""
        from rcic.config import load_recipe

        recipe = load_recipe(self.recipe)
        size = self.cache_size or (recipe.data.image_size if recipe.data.cache else 0)
        return size, recipe.pseudo.enabled or recipe.data.use_test_controls

    def stage_slug(self, k):
        return f"{self.prefix}-stage-{k:02d}"

    def kernel_id(self, slug):
        return f"{self.owner}/{slug}"


def check_slugs(spec):
    """Each kernel's id must be the slug Kaggle makes of its title (see metadata.kaggle_slug):
    a prefix such as 'a--b' or 'rcic-' renders ids Kaggle would not find."""
    for kind in ("stage 01", "cache train", "submit"):
        slug, title = f"{spec.prefix}-{kind.replace(' ', '-')}", f"{spec.prefix} {kind}"
        made = metadata.kaggle_slug(title)
        if made not in (None, slug):
            raise UserError(f"--prefix {spec.prefix!r}: Kaggle makes the title {title!r} into "
                            f"the slug {made!r}, not the kernel's id {slug!r}, and would not "
                            f"find the kernel by its id: use single hyphens between letters "
                            f"and digits, e.g. --prefix rcic-b0")


def template(name):
    """A kernel script template, shipped inside the package (rcic/kernels links ../kernels)."""
    return resources.files("rcic").joinpath("kernels", name).read_text()


def render_script(template_text, settings):
    """The template with its SETTINGS line replaced by `settings` (a literal Python dict)."""
    rendered, count = SETTINGS_LINE.subn(lambda _: f"SETTINGS = {settings!r}", template_text, 1)
    if count != 1:
        raise RuntimeError("kernel template has no 'SETTINGS = ...' line")
    return rendered


def render_chain(spec, out):
    """Write the chain's kernel folders into `out` (which must not hold anything yet)."""
    spec.validate()
    out = Path(out)
    refuse_nonempty(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {out} ({err.strerror}): choose "
                        f"another --out")
    recipe_yaml = Path(spec.recipe).read_text() if spec.recipe else ""
    recipe_file = Path(spec.recipe).name if spec.recipe else ""
    inputs = {"dataset_sources": [spec.kernel_id(spec.bundle)],
              "competition_sources": [spec.competition]}
    kernels = []
    cache_size, stages_read_test = spec.cache_plan()
    caches = {}
    for split in ("train", "test") if cache_size else ():
        slug = f"{spec.prefix}-cache-{split}"
        # No GPU: decoding PNGs is CPU work, and a CPU kernel spends no GPU quota.
        meta = metadata.kernel_metadata(spec.owner, slug, f"{spec.prefix} cache {split}",
                                        CACHE_SCRIPT, gpu=False, **inputs)
        settings = {"kind": "cache", "split": split, "size": cache_size, "format": CACHE_FORMAT}
        kernels.append((f"cache-{split}", CACHE_SCRIPT, settings, meta))
        caches[split] = spec.kernel_id(slug)
    stage_caches = [caches[s] for s in ("train", "test") if s in caches
                    and (s == "train" or stages_read_test)]
    for k in range(1, spec.stages + 1):
        slug = spec.stage_slug(k)
        settings = {"kind": "stage", "stage": k, "stages": spec.stages, "budget": spec.budget,
                    "steps": spec.steps_per_stage, "recipe_file": recipe_file,
                    "recipe_yaml": recipe_yaml, "cache": cache_size}
        previous = [spec.kernel_id(spec.stage_slug(k - 1))] if k > 1 else []
        meta = metadata.kernel_metadata(
            spec.owner, slug, f"{spec.prefix} stage {k:02d}", STAGE_SCRIPT, gpu=True,
            machine_shape=spec.machine_shape, kernel_sources=previous + stage_caches, **inputs)
        kernels.append((f"stage-{k:02d}", STAGE_SCRIPT, settings, meta))
    meta = metadata.kernel_metadata(
        spec.owner, f"{spec.prefix}-submit", f"{spec.prefix} submit", SUBMIT_SCRIPT, gpu=True,
        machine_shape=spec.machine_shape,
        kernel_sources=[spec.kernel_id(spec.stage_slug(spec.stages))]
        + ([caches["test"]] if caches else []), **inputs)
    kernels.append(("submit", SUBMIT_SCRIPT, {"kind": "submit", "cache": cache_size}, meta))

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, script, settings, meta in kernels:
        (tmp / folder).mkdir(parents=True)
        (tmp / folder / script).write_text(render_script(template(script), settings))
        metadata.write_json(tmp / folder / metadata.KERNEL_METADATA, meta)
        metadata.check_kernel_folder(tmp / folder)
    limit, why = spec.limit()
    metadata.write_json(tmp / CHAIN_FILE, {"kernels": [k[0] for k in kernels],
                                           "budget": spec.budget, "stages": spec.stages,
                                           "cache": cache_size, "session_limit": limit,
                                           "session_limit_source":
                                               f"{why}: {session.LIMIT_SOURCE}"})
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return [out / k[0] for k in kernels]


def is_stage(folder):
    """Whether a rendered kernel folder is a training stage (not a cache or the submission)."""
    return Path(folder).name.startswith("stage-")


def kernel_folders(chain_dir):
    """The chain's kernel folders in the order they run, each checked against Kaggle's rules."""
    chain = metadata.read_json(Path(chain_dir) / CHAIN_FILE)
    folders = [Path(chain_dir) / name for name in chain["kernels"]]
    for folder in folders:
        metadata.check_kernel_folder(folder)
    return folders


def kernel_id(folder):
    return metadata.read_json(Path(folder) / metadata.KERNEL_METADATA)["id"]

