"""Dataset adapters: a dataset folder in its published layout -> items + captions tables.

    from leccr.datasets import load_dataset, list_formats
    tables = load_dataset("multi30k", Path("/data/multi30k"), languages=["de"], options={})

One module per format (multi30k, mscoco, vatex, msrvtt_cn), one interface (`base.Adapter`);
`leccr datasets check PATH --format F` (check.py) validates a folder; demo.py generates the demo.
"""

from leccr.datasets.base import (
    Adapter,
    AdapterOptions,
    DatasetFormatError,
    DatasetOptionsError,
    DatasetTables,
    Problem,
    get_adapter,
    list_formats,
    load_dataset,
)

__all__ = [
    "Adapter",
    "AdapterOptions",
    "DatasetFormatError",
    "DatasetOptionsError",
    "DatasetTables",
    "Problem",
    "get_adapter",
    "list_formats",
    "load_dataset",
]
