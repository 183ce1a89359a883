"""PACS receiver: DICOM Storage SCP, report endpoint and drop folder, spool swept into ingest."""

from appliance.receive.landing import ReceiveSummary, ingest_received, queue_report, store_instance
from appliance.receive.scp import ReceiverHandle, serve_receiver, start_receiver

__all__ = ["ReceiveSummary", "ReceiverHandle", "ingest_received", "queue_report", "serve_receiver",
           "start_receiver", "store_instance"]
