"""The silences in the Prefect UI: one table artifact (``icd-silences``), written whenever they change.

Written by ``icd-silence`` after each change, by the health watch when it ends a silence, and by every watch
run as it ends (so a pending silence shows as active once it started). A plain function, not a task, and
written through the client, not ``create_table_artifact``: the CLI calls it outside any flow run, where Prefect
deprecates creating artifacts that way.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate

from icd.health.silences import SilenceBook, table_rows
from icd.text import operator_time

SILENCES_ARTIFACT_KEY = "icd-silences"


def publish_silences(book: SilenceBook, now: datetime | None = None) -> None:
    """The active and pending silences as a table in the UI (Artifacts → icd-silences)."""
    moment = now or datetime.now(UTC)
    current = book.current(moment)
    artifact = ArtifactCreate(
        key=SILENCES_ARTIFACT_KEY,
        type="table",
        data=json.dumps(table_rows(current, moment)),
        description=(
            f"Health silences as of {operator_time(moment)}: {len(current)} active or pending. Matching alerts "
            "are recorded as icd.health.* events labelled icd.silenced, not sent, and page no one. "
            "Change them with icd-silence add | expire."
        ),
    )
    with get_client(sync_client=True) as client:
        client.create_artifact(artifact=artifact)
