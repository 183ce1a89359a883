"""Deterministic synthetic cohorts (chest CT, chest X-ray): DICOM, reports with known labels, planted PHI, ground truth."""

from appliance.synthetic.cohort import CohortSummary, generate_cohort
from appliance.synthetic.cxr import generate_cxr_cohort
from appliance.synthetic.dicom_writer import (
    KERNELS,
    SliceGeometry,
    apply_kernel,
    axial_geometry,
    render_text_mask,
    sample_slices,
    write_ct_series,
)
from appliance.synthetic.phantom import PLANTABLE_FINDINGS, Phantom, Tissue, make_chest_phantom
from appliance.synthetic.uids import synthetic_uid

__all__ = [
    "KERNELS",
    "PLANTABLE_FINDINGS",
    "CohortSummary",
    "Phantom",
    "SliceGeometry",
    "Tissue",
    "apply_kernel",
    "axial_geometry",
    "generate_cohort",
    "generate_cxr_cohort",
    "make_chest_phantom",
    "render_text_mask",
    "sample_slices",
    "synthetic_uid",
    "write_ct_series",
]
