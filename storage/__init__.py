"""Files, index and job queue of the DICOM node (filled in by the `dicom-node serve` work).

Kept as a package from the start so the layout reads network -> storage -> queue -> model ->
writers -> network, and nothing in ``inference`` ever reaches for it.
"""
