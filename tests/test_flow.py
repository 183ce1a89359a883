"""Prefect flow pieces that need no server: which failures are retried."""

import sqlite3

import pytest
from prefect.states import Failed

from appliance.errors import BadInputError, ConfigError
from flows.site import ingest_task, is_transient, preprocess_task, site_pipeline


@pytest.mark.parametrize("exc,retried", [
    (OSError("disk full"), True),
    (sqlite3.OperationalError("database is locked"), True),
    (BadInputError("source folder does not exist", "missing_source"), False),
    (ConfigError("site.yaml: bad value"), False),
    (ValueError("a bug"), False),
])
def test_only_transient_errors_are_retried(exc, retried):
    assert is_transient(None, None, Failed(data=exc)) is retried


def test_tasks_use_the_retry_rule():
    assert ingest_task.retry_condition_fn is is_transient
    assert preprocess_task.retry_condition_fn is is_transient
    assert site_pipeline.name == "site-pipeline"
