"""DICOM in and out around the Res-MTNet engine: reading series, writing SR/SEG/key images, CLI."""

__version__ = "0.1.0"
