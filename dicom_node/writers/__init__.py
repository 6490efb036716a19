"""One class per DICOM result object: SR (TID 1500), SEG and key-image Secondary Capture."""
