"""Fetching from other DICOM nodes: a patient's prior CT, by query/retrieve."""
