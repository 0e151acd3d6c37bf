"""Snapshots during training: every N steps the current embedding or LoRA, written beside the final file.

The notes stop the LoRA just before it starts learning the training images' positions; with a
snapshot every few steps a user picks that step afterwards instead of rerunning. A snapshot is an
ordinary file of its kind (`NAME_step0200.safetensors`, metadata included), written atomically.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_positive_int
from ..errors import OutputExistsError


@dataclass
class Snapshots:
    """Where and how often a run writes its intermediate files.

    Args:
        final_path (`Path`): the run's final output file; snapshot `k` is `STEM_stepKKKK.safetensors` beside it.
        every (`int`): write one every this many steps (not at the last step: that is the final file).
        overwrite (`bool`): replace snapshot files of an earlier run of the same name.
    """

    final_path: Path
    every: int
    overwrite: bool = False
    written: list[Path] = field(default_factory=list)

    def __post_init__(self):
        self.final_path = Path(self.final_path)
        check_positive_int("save_every", self.every)

    def path_for(self, step: int) -> Path:
        name = self.final_path.name
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else self.final_path.stem
        return self.final_path.with_name(f"{stem}_step{step:04d}.safetensors")

    def steps(self, total: int) -> list[int]:
        """The steps that get a snapshot in a run of `total` steps."""
        return list(range(self.every, total, self.every))

    def planned(self, total: int) -> list[Path]:
        return [self.path_for(step) for step in self.steps(total)]

    def check(self, total: int) -> None:
        """Before training: refuse to replace earlier snapshot files without `overwrite`."""
        if self.overwrite:
            return
        existing = [p for p in self.planned(total) if p.exists()]
        if existing:
            raise OutputExistsError(
                f"{len(existing)} snapshot file(s) of this name exist already, e.g. {existing[0]}: choose another output "
                "name, move them, or allow overwriting."
            )

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 and step < total

    def write(self, step: int, save) -> Path:
        """`save(path, overwrite)` the snapshot of `step`; remembers the file."""
        path = save(self.path_for(step), self.overwrite)
        self.written.append(Path(os.fspath(path)))
        return self.written[-1]
