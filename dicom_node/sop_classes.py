"""The SOP classes the node analyzes: what the SCP accepts, selection keeps and the reader reads.

CT Image Storage holds one slice per instance; the two multi-frame classes hold the whole
series in one instance, with each frame's geometry in functional groups.
"""

from __future__ import annotations

from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

MULTI_FRAME_CT = frozenset((EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage))
CT_STORAGE_CLASSES = frozenset((CTImageStorage, *MULTI_FRAME_CT))
