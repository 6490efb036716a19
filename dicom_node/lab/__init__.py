"""Training and evaluating the model on annotated DICOM cases (`dicom-node train`, `evaluate`).

The runtime (`serve`, `analyze`) never imports this package."""
