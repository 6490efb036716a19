"""Coded concepts used in the results, each with where it comes from.

Standard codes wherever one exists (SNOMED CT, DCM, UCUM; docs/conformance.md lists them).
Concepts with no public code (solid and part-solid composition, the Lung-RADS category
values, the calcification head's probability) use the private scheme ``99RESMTNET``,
declared in the SR's Coding Scheme Identification Sequence as PS3.3 C.12.1.1.2.1 asks.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99RESMTNET"

NODULE = Code("27925004", "SCT", "Nodule")  # CID 6102 / CID 3428 finding
MASS = Code("4147007", "SCT", "Mass")  # CID 6102 / CID 3428 finding
#: The finding type of each kind a finding may be (NoduleFinding.kind).
FINDING_TYPES = {"nodule": NODULE, "mass": MASS}
LUNG = Code("39607008", "SCT", "Lung")  # CID 6109 Lung anatomical site
LATERALITY = {
    "left": Code("7771000", "SCT", "Left"),  # CID 244 Laterality
    "right": Code("24028007", "SCT", "Right"),
}
MORPHOLOGIC_ABNORMALITY = Code("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150
DIAMETER = Code("81827009", "SCT", "Diameter")  # CID 7470
LONG_AXIS = Code("103339001", "SCT", "Long Axis")  # CID 7470
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")  # CID 7470
VOLUME = Code("118565006", "SCT", "Volume")  # CID 7470
MEAN_ATTENUATION = Code("112181", "DCM", "Mean Attenuation Coefficient")  # CID 7180 context
#: CID 6142 Calculated Value: the share of the nodule's volume at calcium density.
CALCIFICATION_EXTENT = Code("112019", "DCM", "Calcification extent as percent of volume")
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")  # CID 6040
CT_CHEST = Code("24627-2", "LN", "CT Chest")  # CID 100 procedure reported
FINDING = codes.DCM.Finding
ARTIFICIAL_INTELLIGENCE = codes.cid7162.ArtificialIntelligence  # CID 7162 algorithm family

MM = Code("mm", "UCUM", "millimeter")
MM3 = Code("mm3", "UCUM", "cubic millimeter")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PROBABILITY = Code("{probability}", "UCUM", "probability")
PERCENT = Code("%", "UCUM", "percent")

COMPOSITION = Code("composition", PRIVATE_SCHEME, "Nodule composition")
COMPOSITION_VALUES = {
    "solid": Code("solid", PRIVATE_SCHEME, "Solid"),
    "part-solid": Code("part-solid", PRIVATE_SCHEME, "Part-solid"),
    "ground-glass": Code("112120", "DCM", "Ground glass opacity"),  # no code for the other two
}
#: SNOMED CT's observable for the category; its values have no public codes.
LUNG_RADS = Code("1362105002", "SCT", "Lung Imaging Reporting and Data System category")
#: Private code values stay within CodeValue's 16 characters (longer ones would move to
#: LongCodeValue, which not every reader knows).
PROBABILITY_OF_CALCIFICATION = Code(
    "p-calcification", PRIVATE_SCHEME, "Probability of calcification"
)
NO_NODULE = Code("no-nodule", PRIVATE_SCHEME, "No nodule detected")

#: TID 1502 Time Point Context: a reading without a prior is the patient's baseline.
BASELINE = codes.cid6146.Baseline  # CID 6146 Time Point Type
#: Comparison with a prior study. Stable and shrinking have SNOMED CT qualifiers in DICOM's
#: context groups (CID 3235 "No change", CID 3642 "Decreased"); new, growing and resolved
#: have none there, so they are private, like the measurements of the prior.
INTERVAL_CHANGE = Code("interval-change", PRIVATE_SCHEME, "Change since prior study")
CHANGE_VALUES = {
    "new": Code("new", PRIVATE_SCHEME, "New since prior study"),
    "growing": Code("growing", PRIVATE_SCHEME, "Growing since prior study"),
    "stable": Code("260388006", "SCT", "No change"),
    "shrinking": Code("1250004", "SCT", "Decreased"),
    "resolved": Code("resolved", PRIVATE_SCHEME, "Resolved since prior study"),
}
PRIOR_DIAMETER = Code("prior-diameter", PRIVATE_SCHEME, "Mean diameter at prior study")
PRIOR_VOLUME = Code("prior-volume", PRIVATE_SCHEME, "Volume at prior study")
DIAMETER_CHANGE = Code("diameter-change", PRIVATE_SCHEME, "Change in mean diameter")
VOLUME_CHANGE = Code("volume-change", PRIVATE_SCHEME, "Change in volume")
VOLUME_DOUBLING_TIME = Code("vdt", PRIVATE_SCHEME, "Volume doubling time")
DAYS = Code("d", "UCUM", "day")


def private_scheme_identification() -> Dataset:
    """The Coding Scheme Identification item that declares ``99RESMTNET``."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "Res-MTNet DICOM node private codes"
    item.CodingSchemeResponsibleOrganization = "Res-MTNet DICOM node project"
    return item


def lung_rads_code(category: str, with_prior: bool = False) -> Code:
    """A v2022 category value: from the baseline table, or from the rules for a nodule
    compared with a prior study (another concept, so another code)."""
    if with_prior:
        return Code(
            f"lungrads22-{category}-pr",
            PRIVATE_SCHEME,
            f"Lung-RADS v2022 {category} (compared with prior)",
        )
    return Code(f"lungrads22-{category}", PRIVATE_SCHEME, f"Lung-RADS v2022 {category} (baseline)")
