"""HDF5 collocation and test sets: schema and validation, writer, sharded reader."""

from dstein.data.reader import H5Collocation, read_test_set
from dstein.data.schema import SCHEMA_VERSION, DataFileError, validate
from dstein.data.writer import generate

__all__ = ["SCHEMA_VERSION", "DataFileError", "H5Collocation", "generate", "read_test_set", "validate"]
