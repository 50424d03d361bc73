"""Training samples of several target languages, in a seeded order that a resumed run can replay.

The order of epoch e is a permutation drawn from its own generator (seed, e), not from the global RNG,
so a run resumed at step k of an epoch sees exactly the batches an uninterrupted run saw from step k.
Incomplete last batches are dropped: the in-batch losses want full batches, and data-parallel ranks
must hold equally many rows for the all-gather.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from leccr.data import FeatureTables, TrainingDataset


class MultilingualSamples:
    """One TrainingDataset per language over the same features; sample i = (language, row)."""

    def __init__(
        self,
        features: str | Path | FeatureTables,
        languages: list[str],
        split: str,
        missing_descriptions: str,
        use_states: bool,
    ):
        tables = features if isinstance(features, FeatureTables) else FeatureTables.open(features)
        self.parts = [
            TrainingDataset(tables, lang, split, missing_descriptions, use_states=use_states) for lang in languages
        ]
        self.languages = list(languages)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def sample(self, index: int) -> dict:
        for part, start, end in zip(self.parts, self.offsets, self.offsets[1:]):
            if index < end:
                return part[index - start]
        raise IndexError(index)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.parts[0].collate_fn()([self.sample(int(i)) for i in indices])


def epoch_batches(n_samples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The full batches of epoch `epoch` (0-based), in order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_samples, generator=generator).tolist()
    return [order[start : start + batch_size] for start in range(0, n_samples - batch_size + 1, batch_size)]


class _Batches(Dataset):
    """Batch k = the collated rows this rank takes from global batch k."""

    def __init__(self, samples: MultilingualSamples, batches: list[list[int]], rank: int, world_size: int):
        self.samples, self.batches, self.rank, self.world_size = samples, batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        rows = self.batches[k]
        per_rank = len(rows) // self.world_size
        return self.samples.collate(rows[self.rank * per_rank : (self.rank + 1) * per_rank])


def batch_loader(
    samples: MultilingualSamples, batches: list[list[int]], num_workers: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Collated batches in the given order; workers collate ahead. The loader gets its own generator so
    that starting an iterator does not draw from the global RNG (which seeds dropout)."""
    return DataLoader(
        _Batches(samples, batches, rank, world_size),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
    )
