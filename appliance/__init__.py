"""Site appliance for center-specific radiology foundation models (GreenRFM)."""

__version__ = "0.1.0"
