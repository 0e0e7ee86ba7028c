"""Training data: record formats, loaders and tokenization for SFT."""

from ftlab.data.records import FORMATS, DataError, Table, check_columns, detect_format, load_records
from ftlab.data.tokenize import IGNORE, encode, sft_dataset

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataError",
    "Table",
    "check_columns",
    "detect_format",
    "encode",
    "load_records",
    "sft_dataset",
]
