"""What only trains and measures Res-MTNet: synthetic nodules, training, FROC scoring, the
LIDC reader. The detector at run time needs none of it."""
