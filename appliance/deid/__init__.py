"""De-identification stage: DICOM PS3.15 Annex E headers, burned-in pixels, report text, leakage audit."""
