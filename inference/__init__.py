"""The image pipeline and Res-MTNet: from a CT volume to nodule findings.

Nothing here knows about DICOM networking, databases or highdicom; the caller hands in a
:class:`~inference.volume.Volume` and gets :class:`~inference.findings.NoduleFinding` objects back.
"""
