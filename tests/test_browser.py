"""The operator's screen, in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright
for Python) against the Prefect UI of the end-to-end environment, doing what an operator does.

* From the Slack message's link to the paused run, the Resume form shows what is asked in one line and the
  new version without scrolling, in a table that fits the modal; the full plan is one click away.
* The plan hash is fixed in the form (a schema ``const``, shown disabled). A blank approver applies nothing:
  an empty one or one of spaces is refused by the form (Prefect checks the schema before the run resumes, so
  no "Flow run resumed" toast, and the run waits under the same question); one of zero-width characters
  passes the schema and is refused by the flow, which says why on the run (its state message) and at the
  top of the reopened form, with the plan's headline and table still in view.
* Approving ends ``Deployed`` and moves the channel; what the operator typed shows as typed in the deploy
  record. Rejecting, in another run, applies nothing.

Every step leaves a screenshot: under the test's tmp dir, and copied to ``tests/output/screenshots/<test>/``
(gitignored) so CI keeps them where a person looks. Playwright's own browser builds are never downloaded
(``playwright install`` can't work here); the test installs Debian's chromium and the ``playwright`` package
itself when they are missing, and skips, saying why, only when that is impossible.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from examples.local_env import api_client
from icd.deploy.approval import BLANK_APPROVER
from tests.helpers import consul_instances
from tests.plugins.deploy_env import ENDED, DeployEnv, Names
from tests.waiting import wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Locator, Page

T = TypeVar("T")

SCREENSHOTS = Path(__file__).resolve().parent / "output" / "screenshots"
# A laptop's screen: the size at which the Resume modal must show the plan without scrolling.
VIEWPORT = {"width": 1280, "height": 800}
# Playwright waits on conditions (an element visible, a text shown) up to this long; the UI is a single-page
# app talking to a server that shares two cores with the worker, Terraform and other test sessions.
UI_TIMEOUT_MS = 90_000


# --- what the test needs on the machine -------------------------------------------------------------------


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when it is missing (as scripts/bootstrap.sh does)."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Debian's chromium is not installed and can't be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            pytest.skip(f"Debian's chromium could not be installed ({' '.join(argv)}): {done.stderr[-800:]}")
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium, but no chromium is on PATH"
    return found


def _playwright() -> None:
    """Playwright for Python, pip-installed when missing (it is a dev dependency; a stale venv may lack it)."""
    if importlib.util.find_spec("playwright") is not None:
        return
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "playwright>=1.49"],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"the playwright package could not be installed: {done.stderr[-800:]}")
    importlib.invalidate_caches()


class BrowserThread:
    """Headless Chromium on a thread of its own; ``run(step)`` calls ``step(page)`` there and returns its result.

    Playwright's sync API marks its event loop as running on the thread that drives it, and Prefect's sync
    helpers (``run_deployment``, ``resume_flow_run``, ``Variable.get``) then return coroutines instead of
    running. Keeping the browser off the test's thread lets the test talk to both.
    """

    def __init__(self, executable: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="browser")
        self._playwright: Any = None
        self._browser: Browser | None = None
        self._context: BrowserContext | None = None
        self._page: Page | None = None
        self._pool.submit(self._start, executable).result()

    def _start(self, executable: str) -> None:
        from playwright.sync_api import expect, sync_playwright

        expect.set_options(timeout=UI_TIMEOUT_MS)
        self._playwright = sync_playwright().start()
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        self._browser = self._playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )

    def run(self, step: Callable[[Page], T]) -> T:
        return self._pool.submit(self._run, step).result()

    def _run(self, step: Callable[[Page], T]) -> T:
        if self._page is None:
            assert self._browser is not None
            self._context = self._browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]  # ViewportSize
            self._context.set_default_timeout(UI_TIMEOUT_MS)
            self._page = self._context.new_page()
        return step(self._page)

    def forget_page(self) -> None:
        """Close the current test's browser context; the next step starts a fresh one."""

        def close() -> None:
            if self._context is not None:
                self._context.close()
            self._context = self._page = None

        self._pool.submit(close).result()

    def close(self) -> None:
        def stop() -> None:
            if self._browser is not None:
                self._browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        self._pool.submit(stop).result()
        self._pool.shutdown()


@pytest.fixture(scope="module")
def browser(deploy_env: DeployEnv) -> Iterator[BrowserThread]:
    """One headless Chromium for the module, started once the environment is up."""
    executable = _chromium()
    _playwright()
    thread = BrowserThread(executable)
    try:
        yield thread
    finally:
        thread.close()


class UI:
    """One test's steps in the browser; a step that fails leaves a screenshot of where it failed."""

    def __init__(self, browser: BrowserThread, screens: Screens) -> None:
        self.browser = browser
        self.screens = screens

    def run(self, step: Callable[[Page], T]) -> T:
        try:
            return self.browser.run(step)
        except BaseException:
            self.browser.run(lambda page: self.screens.take(page, f"failed-{step.__name__}"))
            raise


@pytest.fixture
def ui(browser: BrowserThread, screens: Screens) -> Iterator[UI]:
    """The browser with a fresh context (no cookies, no open pages) for one test."""
    try:
        yield UI(browser, screens)
    finally:
        browser.forget_page()


class Screens:
    """Numbered screenshots of one test: in its tmp dir, and copied to tests/output/screenshots/<test>/."""

    def __init__(self, tmp_dir: Path, test_name: str) -> None:
        self.tmp_dir = tmp_dir
        self.stable_dir = SCREENSHOTS / test_name
        shutil.rmtree(self.stable_dir, ignore_errors=True)  # what is there is the last run's, whole
        self.stable_dir.mkdir(parents=True)
        self.taken: list[Path] = []

    def take(self, page: Page, step: str) -> Path:
        path = self.tmp_dir / f"{len(self.taken) + 1:02d}-{step}.png"
        page.screenshot(path=str(path))
        shutil.copy2(path, self.stable_dir / path.name)
        self.taken.append(path)
        return path


@pytest.fixture
def screens(tmp_path: Path, request: pytest.FixtureRequest) -> Screens:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    return Screens(shots, request.node.name)


# --- the Prefect UI, as an operator uses it ---------------------------------------------------------------


def review_link(env: DeployEnv, run_id: Any) -> str:
    """The "Review and approve" button's link in the Slack message about ``run_id``."""

    def find() -> str | None:
        for message in env.slack.messages:
            for block in message.blocks:
                for element in block.get("elements", []):
                    text = element.get("text")
                    url = str(element.get("url", ""))
                    if isinstance(text, dict) and text.get("text") == "Review and approve" and str(run_id) in url:
                        return url
        return None

    return wait_until(find, timeout=60, message="no Slack message links to the paused run")


def open_resume_form(page: Page, url: str) -> Locator:
    """The paused run's page, then its Resume modal; returns the modal."""
    from playwright.sync_api import expect

    page.goto(url)
    page.get_by_role("button", name="Resume", exact=True).first.click()
    dialog = page.get_by_role("dialog")
    expect(description(dialog)).to_be_visible()
    return dialog


def description(dialog: Locator) -> Locator:
    """The form's description: the plan summary the flow wrote (``PlanView.approval_markdown``)."""
    return dialog.locator(".p-modal__body > article.markdown-renderer")


def state_message_on(page: Page, run_url: str) -> Locator:
    """The run page's state message, as its Details tab shows it (its first 70 characters, then "See More")."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    state_message = page.locator(".p-key-value").filter(has=page.get_by_text("State Message", exact=True))

    def shown() -> bool:
        # A click on "Details" while the page is still rendering its tabs can be lost (once in CI the Logs tab
        # stayed open for 90 s), so the page is opened again until the tab shows.
        page.goto(run_url)
        page.get_by_text("Details", exact=True).click()
        try:
            state_message.wait_for(state="visible", timeout=15_000)
        except PlaywrightTimeoutError:
            return False
        return True

    wait_until(shown, timeout=90, message="the run page's Details tab never showed the state message")
    state_message.scroll_into_view_if_needed()
    return state_message


def headline(dialog: Locator) -> Locator:
    """The one line that says what is asked ("Deploy acmeinc/web v1 → v2 to staging: 1 replace")."""
    return description(dialog).locator(".markdown-renderer__text--strong", has_text=re.compile(r"^Deploy "))


def field(dialog: Locator, label: str) -> Locator:
    """One field of the form generated from the RunInput schema, by its label (Prefect adds " (Optional)" to
    the label of a field that isn't required)."""
    # ``has`` is matched inside each property, so it is built from the page, not from the dialog.
    name = re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
    label_text = dialog.page.locator(".schema-form-property__label", has_text=name)
    return dialog.locator(".schema-form-property").filter(has=label_text)


def choose(dialog: Locator, decision: str) -> None:
    from playwright.sync_api import expect

    control = field(dialog, "Decision").locator("button.p-select-button__control")
    # The select opens on the keyboard every time; a click can land before the app listens for it.
    control.focus()
    control.press("ArrowDown")
    dialog.page.get_by_role("option", name=decision, exact=True).click()
    expect(control).to_have_text(decision)


def type_into(dialog: Locator, label: str, text: str) -> None:
    field(dialog, label).locator("textarea").fill(text)


def submit(dialog: Locator) -> None:
    from playwright.sync_api import expect

    dialog.get_by_role("button", name="Submit", exact=True).click()
    expect(dialog).to_be_hidden()


def fits_across(locator: Locator) -> bool:
    """Nothing in the element is wider than the element: no sideways scrolling."""
    return bool(locator.evaluate("el => el.scrollWidth <= el.clientWidth"))


def artifact_url(env: DeployEnv, key: str, run_id: Any) -> str:
    found = api_client().read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
        )
    )
    assert found, f"run {run_id} published no artifact {key!r}"
    return f"{env.server.ui_url}/artifacts/artifact/{found[0].id}"


def _pushed_v2(env: DeployEnv, names: Names) -> None:
    env.repo.commit("v2", {"src/app.py": env.repo.read("src/app.py") + f"\n# v2 of {names.namespace}\n"})


# --- the tests --------------------------------------------------------------------------------------------


def test_approving_in_the_browser(deploy_env: DeployEnv, ui: UI, screens: Screens) -> None:
    from playwright.sync_api import expect

    env = deploy_env
    names = env.service()
    ns, ws = names.namespace, names.workspace
    first, v1 = env.deploy_until_paused(names)
    assert env.approve(first.id, ws).state.name == "Deployed"  # type: ignore[union-attr]  # v1 runs: v2 replaces it
    _pushed_v2(env, names)
    run, v2 = env.deploy_until_paused(names)
    reg = env.registry.registry()
    image_v2 = reg.get(ns, v2)
    digest_v2 = image_v2.artifact_sha256["local"]
    link, plan_sha = review_link(env, run.id), env.plan_sha(ws, run.id)

    def the_plan_where_you_approve(page: Page) -> None:
        """From Slack to the form: the question in one line and the new version, without scrolling."""
        form = open_resume_form(page, link)
        summary = description(form)
        expect(headline(form)).to_have_text(f"Deploy {ns} v{v1} → v{v2} to {ws}: 1 replace")
        expect(headline(form)).to_be_in_viewport(ratio=1)
        after = summary.locator("td").filter(has_text=f"v{v2} · ")
        expect(after).to_have_text(f"v{v2} · {digest_v2[:8]}")
        expect(after).to_be_in_viewport(ratio=1)
        screens.take(page, "approval-form")
        assert fits_across(summary.locator(".p-table")), "the plan table scrolls sideways"
        assert fits_across(summary), "the plan is wider than the Resume modal"
        assert fits_across(form.locator(".p-modal__body")), "the Resume modal scrolls sideways"
        assert image_v2.artifacts["local"] not in summary.inner_text(), "short labels, not image paths"
        for required in ("Decision", "Approver"):  # no "(Optional)" on what is required
            expect(field(form, required).locator(".schema-form-property__label")).to_have_text(required)
        expect(field(form, "Decision").locator("button.p-select-button__control")).to_have_text("")  # no default
        fixed_hash = field(form, "Plan Sha256").locator("textarea")
        expect(fixed_hash).to_be_disabled()  # a schema const: the form can't change it
        expect(fixed_hash).to_have_value(plan_sha)

        # The full values are one click away, on the new version's label: the plan artifact names the image
        # and its whole digest.
        with page.context.expect_page() as opened:
            after.get_by_role("link").click()
        full_plan = opened.value
        expect(full_plan.locator("body")).to_contain_text(digest_v2)
        expect(full_plan.locator("body")).to_contain_text(plan_sha)
        screens.take(full_plan, "full-plan")
        full_plan.close()

        # An empty approver: the form itself refuses it.
        choose(form, "approve")
        form.get_by_role("button", name="Submit", exact=True).click()
        expect(field(form, "Approver")).to_contain_text("required")
        screens.take(page, "empty-approver-refused-by-the-form")

    ui.run(the_plan_where_you_approve)
    paused = env.read(run.id).state
    assert paused is not None, "the run goes on waiting for the same answer"
    assert (paused.type.value, paused.state_details.pause_key) == ("PAUSED", "approval-0")

    def spaces_refused_before_the_resume(page: Page) -> None:
        """One of spaces: Prefect checks the form's schema before the run resumes; the UI says why, in red,
        and keeps the form open; it never says the run resumed."""
        form = page.get_by_role("dialog")
        type_into(form, "Approver", "   ")
        form.get_by_role("button", name="Submit", exact=True).click()
        toasts = page.locator(".p-toast__message")
        expect(toasts.filter(has_text="Validation failed for field 'approver'").first).to_be_visible()
        screens.take(page, "spaces-refused-by-the-form")
        expect(toasts.filter(has_text="resumed")).to_have_count(0)  # the answer's verdict is in: no green toast
        expect(form).to_be_visible()

    ui.run(spaces_refused_before_the_resume)
    paused = env.read(run.id).state
    assert paused is not None, "the run goes on waiting for the same answer"
    assert (paused.type.value, paused.state_details.pause_key) == ("PAUSED", "approval-0")

    def invisible_approver(page: Page) -> None:
        """One of zero-width characters is no space: it passes the form and the flow refuses it."""
        form = page.get_by_role("dialog")
        type_into(form, "Approver", "\u200b")
        submit(form)

    ui.run(invisible_approver)
    env.wait_for_pause(run.id, "approval-1")
    reason = BLANK_APPROVER
    wait_until(lambda: reason in env.state_message(run.id), timeout=60, message="the reason never reached the run")

    def the_reason_on_the_run_and_atop_the_form(page: Page) -> None:
        state_message = state_message_on(page, link)
        expect(state_message).to_contain_text("Answer not accepted: the approver name")  # the first 70 characters
        state_message.get_by_text("See More").click()
        expect(state_message).to_contain_text(f"Answer not accepted: {reason}. Waiting for approval: Deploy {ns}")
        screens.take(page, "refusal-on-the-run")
        form = open_resume_form(page, link)
        refusal = description(form).locator(".markdown-renderer__text--paragraph").first
        expect(refusal).to_have_text(f"Answer not accepted: {reason}")
        screens.take(page, "refusal-atop-the-reopened-form")
        # Where the operator answers again: the reason, the question and the plan's table, without scrolling.
        expect(refusal).to_be_in_viewport(ratio=1)
        expect(headline(form)).to_be_in_viewport(ratio=1)
        expect(description(form).locator(".p-table")).to_be_in_viewport(ratio=1)
        expect(description(form).locator("td").filter(has_text=f"v{v2} · ")).to_be_in_viewport(ratio=1)

    ui.run(the_reason_on_the_run_and_atop_the_form)

    comment = "ship it | *now* <b>v2</b>"

    def approving(page: Page) -> None:
        form = page.get_by_role("dialog")
        choose(form, "approve")
        type_into(form, "Approver", "Ada L.")
        type_into(form, "Comment", comment)
        screens.take(page, "approving")
        submit(form)

    ui.run(approving)
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None and done.state.name == "Deployed", done.state
    assert reg.get_channel(ns, ws).version == v2  # type: ignore[union-attr]  # the workspace's channel moved
    assert reg.channel_history(ns, ws)[-1].assigned_by == "Ada L."
    assert env.holder(ws) is None
    record_url = artifact_url(env, f"deploy-{ws}", run.id)

    def deployed_and_recorded(page: Page) -> None:
        expect(state_message_on(page, link)).to_contain_text("Approved by Ada L.; healthy in Consul")
        expect(page.get_by_text("Deployed", exact=True).first).to_be_visible()
        screens.take(page, "deployed")
        page.goto(record_url)
        record = page.locator("article.markdown-renderer table").first
        expect(record).to_contain_text(comment)  # escaped for Markdown, so shown as typed: no bold, no HTML
        headers = [text.strip() for text in record.locator("th").all_inner_texts()]
        assert headers, "the deploy record is a table with a header row"
        assert all(headers), f"the deploy record's table has an empty header cell: {headers}"
        screens.take(page, "deploy-record")

    ui.run(deployed_and_recorded)


def test_rejecting_in_the_browser_applies_nothing(deploy_env: DeployEnv, ui: UI, screens: Screens) -> None:
    from playwright.sync_api import expect

    env = deploy_env
    names = env.service()
    run, version = env.deploy_until_paused(names)
    link = review_link(env, run.id)

    def rejecting(page: Page) -> None:
        form = open_resume_form(page, link)
        asked = f"Deploy {names.namespace} v{version} to {names.workspace}: 1 add"
        expect(headline(form)).to_have_text(asked)
        choose(form, "reject")
        type_into(form, "Approver", "bob")
        type_into(form, "Comment", "not today")
        screens.take(page, "rejecting")
        submit(form)

    ui.run(rejecting)
    done = env.wait_for(run.id, states=ENDED)
    assert done.state is not None
    assert (done.state.type.value, done.state.name) == ("CANCELLED", "Rejected"), done.state
    assert env.registry.registry().get_channel(names.namespace, names.workspace) is None, "no channel moved"
    assert consul_instances(env, names.service_name) == [], "no instance was started"
    assert env.holder(names.workspace) is None

    def rejected(page: Page) -> None:
        expect(state_message_on(page, link)).to_contain_text("rejected by bob: not today; nothing applied")
        expect(page.get_by_text("Rejected", exact=True).first).to_be_visible()
        screens.take(page, "rejected")

    ui.run(rejected)
