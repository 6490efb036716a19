"""From stored instances to results: when a series is complete, which series are analyzed,
reading them into volumes, running the model and building the SR, SEG and key images, and
deleting images once they are no longer needed."""
