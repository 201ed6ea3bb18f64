"""Calibration data: named sets of documents read from files and packed into token sequences."""

from moekit.data.packing import CalibrationSet, load_calibration_set, pack_documents
from moekit.data.sources import DataError, DataSpec, read_documents
from moekit.data.tokenizer import load_tokenizer

__all__ = ["CalibrationSet", "DataError", "DataSpec", "load_calibration_set", "load_tokenizer", "pack_documents",
           "read_documents"]
