"""The class-to-index map: fixed once per dataset, saved with it and with every bundle."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

DEFAULT_CLASSES = ("Enfeksiyonel", "Ekzama", "Akne", "Pigment", "Benign", "Malign")

# "1. Enfeksiyonel", "03-Akne", "2_Ekzama": the number orders the class, the rest names it.
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.\-_)]?\s*(.+?)\s*$")


class ClassMapError(ValueError):
    """Two class maps disagree, or a class map is malformed."""


def display_name(folder: str) -> str:
    """`1. Enfeksiyonel` -> `Enfeksiyonel`; an unnumbered name is returned unchanged."""
    m = _NUMBERED.match(folder)
    return m.group(2) if m else folder.strip()


def _folder_sort_key(folder: str) -> tuple[int, str]:
    m = _NUMBERED.match(folder)
    return (int(m.group(1)), m.group(2)) if m else (10**9, folder)


@dataclass(frozen=True)
class ClassMap:
    """Ordered class names; the index of a name is its position."""

    names: tuple[str, ...] = DEFAULT_CLASSES

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        if len(names) < 2:
            raise ClassMapError(f"a class map needs at least 2 classes, got {list(names)}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ClassMapError(f"class names must be unique; repeated: {dup}")
        if any(not n.strip() for n in names):
            raise ClassMapError("class names must not be empty")
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ClassMapError(f"unknown class {name!r}; the classes are {list(self.names)}") from None

    def name(self, index: int) -> str:
        return self.names[index]

    @classmethod
    def from_folders(cls, folders: Iterable[str]) -> "ClassMap":
        """Order folders by their leading number (then name) and strip the number for display."""
        ordered = sorted(set(folders), key=_folder_sort_key)
        return cls(tuple(display_name(f) for f in ordered))

    def to_json(self) -> dict:
        return {"classes": list(self.names)}

    @classmethod
    def from_json(cls, data: dict) -> "ClassMap":
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise ClassMapError('a class map file must look like {"classes": ["A", "B", ...]}')
        return cls(tuple(data["classes"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        return cls.from_json(json.loads(Path(path).read_text()))

    def check_same(self, other: "ClassMap", what: str = "the two class maps") -> None:
        """Refuse to combine anything whose class order differs."""
        if self.names != other.names:
            raise ClassMapError(
                f"{what} differ: {list(self.names)} vs {list(other.names)}; models and data "
                "must share one class map (same names in the same order)"
            )
