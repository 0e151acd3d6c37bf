"""Training on aspect-ratio buckets: batches of one bucket, sizes the model can take, the bucket report.

Which bucket an image goes to is decided when it is loaded (`aspect_buckets.py`, `dataset.py`);
here the loops draw batches so that the images of a batch share a size (as kohya's
`BucketManager`: each bucket's images shuffled and cut into batches, the batches shuffled).
"""

import logging

import torch

from ..aspect_buckets import describe_histogram
from ..dataset import ImageDataset
from ..errors import InvalidInputError
from ..models.bundle import ModelBundle

logger = logging.getLogger(__name__)


def bucket_epoch(groups: list[list[int]], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: each group's images shuffled and cut into batches of `batch_size` (a group's
    last batch may be smaller), then the batches shuffled. Every image appears once."""
    batches = []
    for group in groups:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches += [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def check_training_sizes(bundle: ModelBundle, dataset: ImageDataset) -> None:
    """Raise unless the model can train at every size of `dataset` (its resolution, or each bucket's sides)."""
    if not dataset.bucketed:
        bundle.check_resolution(dataset.resolution)
        return
    multiple = bundle.resolution_multiple
    for index in range(len(dataset)):
        height, width = dataset.image_size(index)
        if height % multiple or width % multiple:
            raise InvalidInputError(
                f"aspect-ratio bucket {width}x{height} (of {dataset.names[index]}) has a side that is not a multiple of "
                f"{multiple}, which this model needs: set `bucket_step` to a multiple of {multiple}."
            )


def training_groups(dataset: ImageDataset) -> list[list[int]] | None:
    """The image indices of each bucket when there are several buckets (for `BatchSampler`), else None."""
    groups = dataset.groups()
    return groups if len(groups) > 1 else None


def report_buckets(dataset: ImageDataset) -> None:
    """Log the bucket histogram at the start of a run (with buckets only)."""
    if dataset.bucketed:
        logger.info("%s", describe_histogram([dataset.image_size(i) for i in range(len(dataset))]))
