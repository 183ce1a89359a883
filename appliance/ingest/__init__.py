"""Ingest stage: DICOM folder + report sidecar -> raw/ and the catalog, bad input quarantined."""

from appliance.ingest.stage import IngestSummary, ingest_folder

__all__ = ["IngestSummary", "ingest_folder"]
