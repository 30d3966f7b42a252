"""What the operator reads where they approve: the headline, the compact table of the Resume form, the full
plan one click away, and one time format. Pure functions, no server (the browser test shows them in the UI).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from icd.deploy.approval import approval_form
from icd.deploy.plan_view import artifact_label, short_artifact_id, summarize_plan
from icd.registry.models import ArtifactVersion
from icd.text import operator_time
from icd.tools.terraform import Plan, ResourceChange

NS = "acmeinc/web"
IMAGE = "/var/lib/icd/images/run-0b5c6f0e-2d7a-4cbe-9d0e-6f1a2b3c4d5e/acmeinc_web/web-{}.tar.gz"
DIGEST = {1: "3f2a9c1b" + "0" * 56, 2: "8d0e4f7a" + "1" * 56}
PLAN_SHA = "d77801f4fd97" + "ab" * 26


def _version(number: int) -> ArtifactVersion:
    return ArtifactVersion(
        namespace=NS,
        version=number,
        git_commit="c0ffee",
        git_ref="main",
        packer_run_uuid="uuid",
        builder_type="null",
        artifacts={"local": IMAGE.format(number)},
        artifact_sha256={"local": DIGEST[number]},
        created_at=datetime(2026, 11, 27, tzinfo=UTC),
        created_by="ci",
    )


def _change(address: str, actions: tuple[str, ...], before: int | None, after: int | None) -> ResourceChange:
    def values(number: int | None) -> dict[str, object] | None:
        return None if number is None else {"triggers": {"artifact_id": IMAGE.format(number)}}

    return ResourceChange(address, "null_resource", "instance", actions, values(before), values(after))


def _view(*changes: ResourceChange):  # type: ignore[no-untyped-def]  # PlanView, named by summarize_plan
    known = {IMAGE.format(n): _version(n) for n in DIGEST}
    return summarize_plan(
        Plan("1.0", "1.0.3", changes, (), PLAN_SHA),
        namespace=NS,
        to_version=2,
        channel="staging",
        channel_version=None,
        find_version=known.get,
    )


REPLACE = _change("null_resource.instance", ("delete", "create"), 1, 2)


def test_headline_says_what_is_asked_in_one_line() -> None:
    assert _view(REPLACE).headline("staging") == "Deploy acmeinc/web v1 → v2 to staging: 1 replace"
    first = _view(_change("null_resource.instance", ("create",), None, 2))
    assert first.headline("staging") == "Deploy acmeinc/web v2 to staging: 1 add"
    several = _view(REPLACE, _change("null_resource.extra", ("create",), None, 2))
    assert several.headline("staging").endswith(": 1 add, 1 replace")


def test_the_form_starts_with_the_headline_and_shows_short_labels_only() -> None:
    url = "http://ui/artifacts/artifact/42"
    text = _view(REPLACE).approval_markdown(workspace="staging", details_url=url)
    lines = text.splitlines()
    assert lines[0] == "**Deploy acmeinc/web v1 → v2 to staging: 1 replace**"
    # The new image's short label links to the full plan: the full values are one click away. The address
    # may wrap after its dot (a zero-width space), so the table never outgrows the modal.
    assert f"| null\\_resource.\u200binstance | replace | v1 | [v2 · 8d0e4f7a]({url}) |" in lines
    assert "/var/lib" not in text, "no image paths in the form"
    assert PLAN_SHA not in text, "the whole hash is the form's field, not its text"
    # The modal may clip the last lines: they only repeat the link and the form's own hash field.
    assert lines[-1].startswith(f"[Full plan]({url}) · channel `staging` · plan sha256 `{PLAN_SHA[:12]}…`")


def test_the_full_plan_names_every_full_value() -> None:
    text = _view(REPLACE).markdown(workspace="staging", extra={"Run": "http://ui/runs/flow-run/1"})
    assert text.startswith("## Deploy acmeinc/web v1 → v2 to staging: 1 replace\n")
    for number in (1, 2):
        assert DIGEST[number] in text
        assert IMAGE.format(number).replace("_", "\\_") in text  # escaped for Markdown, shown as typed
    assert PLAN_SHA in text
    assert "nothing deployed" not in text


def test_a_resource_address_cannot_break_the_table() -> None:
    odd = _change('null_resource.instance["a|b"]', ("delete", "create"), 1, 2)
    rows = _view(odd).approval_markdown(workspace="staging", details_url=None).splitlines()
    [row] = [line for line in rows if line.startswith("| null")]
    assert row.count(" | ") == 3, row
    assert "Artifacts tab" in rows[-1], "without the UI's address the form says where the full plan is"
    assert "](" not in row, "and links nothing"


@pytest.mark.parametrize(
    ("artifact", "digest", "short"),
    [
        (IMAGE.format(2), DIGEST[2], "8d0e4f7a"),
        ("/images/web-2.tar.gz", None, "web-2.tar.gz"),
        ("/images/a-very-long-image-name-indeed.tar.gz", None, "a-very-long…"),
        ("ami-0abc1234", None, "ami-0abc1234"),
    ],
)
def test_short_artifact_ids(artifact: str, digest: str | None, short: str) -> None:
    assert short_artifact_id(artifact, digest) == short
    assert len(short) <= 12


def test_artifact_labels() -> None:
    assert artifact_label(IMAGE.format(2), 2, DIGEST[2]) == "v2 · 8d0e4f7a"
    assert artifact_label("ami-0abc1234", None) == "ami-0abc1234"  # not in the registry: no version
    assert artifact_label(IMAGE.format(1), 1, DIGEST[1], short=False) == "v1"
    assert artifact_label(None, None) == "-"


def test_a_refused_answer_opens_the_form_and_is_escaped() -> None:
    summary = _view(REPLACE).approval_markdown(workspace="staging", details_url=None)
    form = approval_form(PLAN_SHA, summary, refusal="the plan hash <b>x</b> | *y* differs")
    text = form._description
    assert isinstance(text, str)
    first, rest = text.split("\n\n", 1)
    assert first == "**Answer not accepted:** the plan hash &lt;b&gt;x&lt;/b&gt; \\| \\*y\\* differs"
    assert rest.startswith("**Deploy acmeinc/web v1 → v2 to staging: 1 replace**")
    assert approval_form(PLAN_SHA, summary)._description == summary


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 27, 20, 29, 5, 123456, tzinfo=UTC),
        datetime(2026, 11, 27, 21, 29, 5, tzinfo=timezone(timedelta(hours=1))),
        datetime(2026, 11, 27, 20, 29, 5),  # naive: taken as UTC
        "2026-11-27T20:29:05+00:00",  # as the workspace lock records it
    ],
)
def test_one_time_format_for_operators(moment: datetime | str) -> None:
    assert operator_time(moment) == "2026-11-27 20:29:05 UTC"
