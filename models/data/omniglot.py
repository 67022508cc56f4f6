"""Omniglot in its standard layout, from a folder or straight from the official zip.

Layout: ``images_background/<Alphabet>/<characterNN>/<id>_<NN>.png`` (and likewise
``images_evaluation``). Any prefix before ``<Alphabet>/<character>/<file>.png`` is accepted,
so a folder pointing at the set itself or at its parent both work.
"""

from __future__ import annotations

import shutil
import urllib.request
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.data.preprocess import decode_grayscale, preprocess

OFFICIAL_URLS = {
    "images_background": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}

# Background alphabets held out from training for validation of the shipped model.
VALIDATION_ALPHABETS: tuple[str, ...] = (
    "Bengali",
    "Futurama",
    "Hebrew",
    "Korean",
    "Tifinagh",
)


@dataclass
class Omniglot:
    """Preprocessed drawings: images[c] is a float32 [drawings, S, S] array of character c."""

    images: list[np.ndarray]
    characters: list[tuple[str, str]]  # (alphabet, character) per class

    @property
    def alphabets(self) -> list[str]:
        return sorted({alphabet for alphabet, _ in self.characters})

    def as_array(self) -> np.ndarray:
        """[C, D, S, S] float32, keeping the smallest drawing count D over characters."""
        drawings = min(len(x) for x in self.images)
        return np.stack([x[:drawings] for x in self.images])

    def select(self, alphabets: list[str] | tuple[str, ...], exclude: bool = False) -> Omniglot:
        """The characters of the given alphabets (or of all the others when ``exclude``)."""
        wanted = set(alphabets)
        unknown = wanted - set(self.alphabets)
        if unknown and not exclude:
            raise ValueError(f"unknown alphabets: {', '.join(sorted(unknown))}")
        keep = [i for i, (a, _) in enumerate(self.characters) if (a in wanted) != exclude]
        return Omniglot([self.images[i] for i in keep], [self.characters[i] for i in keep])

    def split(self, validation_alphabets: list[str] | tuple[str, ...]) -> tuple[Omniglot, Omniglot]:
        """(training, validation): the validation alphabets present here are held out whole."""
        held_out = [a for a in validation_alphabets if a in self.alphabets]
        return self.select(validation_alphabets, exclude=True), self.select(held_out)


def _index(names: list[str]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) >= 3 and parts[-1].lower().endswith(".png") and not parts[-1].startswith("."):
            groups[(parts[-3], parts[-2])].append(name)
    return groups


def load_omniglot(source: str | Path, image_size: int = 28, alphabets: list[str] | None = None) -> Omniglot:
    """Read every character drawing under ``source`` (folder or .zip) and preprocess it."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such Omniglot folder or zip")
    archive = zipfile.ZipFile(path) if path.is_file() else None
    try:
        if archive is not None:
            groups = _index(archive.namelist())
            read = archive.read
        else:
            groups = _index([str(p.relative_to(path)) for p in path.rglob("*.png")])

            def read(name: str) -> bytes:
                return (path / name).read_bytes()

        if alphabets is not None:
            groups = {k: v for k, v in groups.items() if k[0] in set(alphabets)}
        if not groups:
            raise ValueError(f"{path}: no <alphabet>/<character>/<drawing>.png files found")
        characters = sorted(groups)
        images = [
            np.stack([preprocess(decode_grayscale(read(n)), image_size) for n in sorted(groups[key])])
            for key in characters
        ]
    finally:
        if archive is not None:
            archive.close()
    return Omniglot(images, characters)


def download_omniglot(
    destination: str | Path, sets: tuple[str, ...] = ("images_background",), base_urls: dict[str, str] | None = None
) -> list[Path]:
    """Fetch the official zips into ``destination`` (skipping those already there)."""
    urls = base_urls or OFFICIAL_URLS
    folder = Path(destination)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in sets:
        target = folder / f"{name}.zip"
        if not target.exists():
            tmp = target.with_suffix(".zip.part")
            with urllib.request.urlopen(urls[name], timeout=60) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
            with zipfile.ZipFile(tmp) as check:
                if check.testzip() is not None:
                    raise ValueError(f"{urls[name]}: corrupt zip")
            tmp.replace(target)
        paths.append(target)
    return paths
