"""Every private Prefect, botocore and interpreter name the patches in this package rely on, and a check that
each is still what it was when the patches were written.

Prefect is pinned (pyproject.toml), but nothing else would notice that an upgrade moved or changed one of
these: the warm worker would fail at its first run, or, worse, run with a subtly different contract. So each
seam records a fingerprint of exactly what is relied on: the sha256 of the source of the function or class
we call, subclass, copy or replace (``source``), the text of its signature where only the call shape
matters (``signature``), or that it is there at all where there is no source to read (``present``, for the
interpreter's C-level names). ``verify()`` recomputes them; ``tests/test_prefect_seams.py`` fails on any
difference, naming the seam, what we rely on and the module to re-check.

After re-checking a patch against a new version (or deciding to run on Prefect's stock worker instead:
``prefect worker start --type process`` on the same pool, nothing else changes), record the new values with
``python -m prefect_patches.seams --record`` and paste them here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

# The Prefect release every seam below was read against (pyproject.toml pins the same).
CHECKED_AGAINST_PREFECT = "3.9.1"

Kind = Literal["source", "signature", "present"]

_WARM = "prefect_patches/warm_worker.py"
_PRELOAD = "prefect_patches/fork_server_preload.py"
_TLS = "prefect_patches/shared_tls.py"
_SETTINGS = "prefect_patches/settings_reuse.py"
_PULL_STEP = "prefect_patches/pull_step_events.py"
_HEARTBEAT = "prefect_patches/heartbeat_stop.py"


@dataclass(frozen=True)
class Seam:
    module: str
    attribute: str  # dotted, inside the module; "" for the module itself
    relied_on: str
    user: str  # the patch to re-check when it changes
    kind: Kind
    fingerprint: str  # sha256 (hex) of the source or signature text; "" for ``present``

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}" if self.attribute else self.module


SEAMS: tuple[Seam, ...] = (
    # --- the warm worker: Prefect's runner internals -------------------------------------------------------
    Seam(
        "prefect.runner._flow_run_executor",
        "ProcessStarter",
        "the protocol a starter implements: async start(flow_run, task_status) that reports a ProcessHandle",
        _WARM,
        "source",
        "4c1ba91c9edf2c63353d7e38ab7c4c0c8696af02c8d1a4f248b7c661d609ab65",
    ),
    Seam(
        "prefect.runner._flow_run_executor",
        "FlowRunExecutorContext",
        "an async context with .control_channel and create_executor(flow_run, starter, resolve_flow=, "
        "propose_submitting=)",
        _WARM,
        "source",
        "483fec0efca4a711ddc2fd9098455a791b71f99fda017acc15abea338ede22c7",
    ),
    Seam(
        "prefect.runner._flow_run_executor",
        "FlowRunExecutor",
        "submit(task_status=) starts the starter, reports its ProcessHandle, tracks the process, proposes "
        "Crashed when it dies, and returns a FlowRunExecutionResult",
        _WARM,
        "source",
        "33c974c665cb0f8be3ff23381e53d173ec784d497606232be1f6ef300bb85710",
    ),
    Seam(
        "prefect.runner._flow_run_executor",
        "FlowRunExecutionResult",
        "its status_code and handle.pid, turned into the worker's result",
        _WARM,
        "source",
        "fa02111d1cdcb6956c521e2c0dae3dd61710f41539501644571c234e28f1f610",
    ),
    Seam(
        "prefect.runner._process_manager",
        "ProcessHandle",
        "wraps any process object with pid, exitcode and is_alive() (a multiprocessing process is one)",
        _WARM,
        "source",
        "ee5a7fc1a23ab8c336c52c908de89c3b36a6f9f1d98305d674935a0f93d7fbd4",
    ),
    Seam(
        "prefect.runner._control_channel",
        "ControlChannel.register",
        "register(flow_run_id) -> (port, token), the run's PREFECT__CONTROL_PORT/TOKEN; RuntimeError when "
        "there is no listener",
        _WARM,
        "source",
        "7e8974dde090852ff785ba45cb66dfb734c1922d718d8eb5c521be8d73b94e80",
    ),
    Seam(
        "prefect.runner._control_channel",
        "ControlChannel.unregister",
        "unregister(flow_run_id) when a run's process never started",
        _WARM,
        "source",
        "365ae075d83cd9588d0675d8582e17ecdda4ad1f3e73da72fedbf9fe179f03ae",
    ),
    Seam(
        "prefect.runner._starter_engine",
        "EngineCommandStarter.start",
        "how the cold start builds a run's environment (job env, worker settings, run id, hooks off, control "
        "channel): ForkedEngineStarter builds the same",
        _WARM,
        "source",
        "3e80e81f684b713e56375134bf0bbc81b9ca130cd81cfb31ef717cd594fa83f6",
    ),
    Seam(
        "prefect.engine",
        "",
        "run as __main__ in the forked child (runpy), it runs the flow run named by PREFECT__FLOW_RUN_ID",
        _WARM,
        "source",
        "b8cdbed3c4c320f7fd4482caae0d07cdcf73ba109bb4f0e8f424232b0ff573eb",
    ),
    # --- the warm worker: the process worker it subclasses ---------------------------------------------------
    Seam(
        "prefect.workers.process",
        "ProcessWorker.run",
        "the cold run that _run_forked mirrors, step for step, with another starter",
        _WARM,
        "source",
        "05306468a6b3266bf8eb7d679a792737d0decee4d43b23e382ca07508463ace3",
    ),
    Seam(
        "prefect.workers.process",
        "ProcessJobConfiguration.prepare_for_flow_run",
        "sets the private _command_configured before filling in the engine command: only a job without a "
        "command of its own runs warm",
        _WARM,
        "source",
        "96a9dfe9d899ab31ba78fc9adc09a5a31f0d8a7d166a3e299c6064c62914616d",
    ),
    Seam(
        "prefect.workers.base",
        "BaseWorker._release_limit_slot",
        "called once per submission when its process ends; overridden to skip the release made early",
        _WARM,
        "source",
        "fdb5b2e4b82555122311fa27278ec1eab6656c3206f52ee6d758436cafede624",
    ),
    Seam(
        "prefect.workers.base",
        "BaseWorker._propose_submitting_state",
        "raises Pause for a run that is waiting again; overridden to leave that run unstarted",
        _WARM,
        "source",
        "a4e54c1320f34fe2dfad436399956b474e891d1e4d7f4b1fac369c405b113d7f",
    ),
    Seam(
        "prefect.workers.base",
        "BaseWorker._propose_pending_state",
        "returns whether to submit; raises Pause for a run that is waiting again, overridden to return False",
        _WARM,
        "source",
        "8d1630c3bc207549b2162cadebab2162965c2c6f2ddd50150e9315dc976af1e6",
    ),
    Seam(
        "prefect.workers.base",
        "BaseWorker._submit_scheduled_flow_runs",
        "takes the private _limiter's slot on behalf of the flow run id, which a suspended run gives back early",
        _WARM,
        "source",
        "e027756fcfad3da3d5ec76e1d9855a5efb22ea77ceb717ecadd5da9879c5c8de",
    ),
    Seam(
        "prefect.workers.base",
        "BaseWorker.__init__",
        "sets the private _work_pool_name, _logger and _limiter the warm worker reads",
        _WARM,
        "source",
        "702c771946934fc56720a2cbad09f13f72f29ec569ac638807a42739b1de0e73",
    ),
    # --- the warm worker: the interpreter's own exit steps (a forkserver child ends in os._exit) -------------
    Seam(
        "threading",
        "_shutdown",
        "called with no arguments, joins the non-daemon threads and runs the threading exit hooks",
        _WARM,
        "signature",
        "2e38e77b22c314a449e91fafed92a43826ac6aa403ae6a8acb6cf58239fbaf5d",
    ),
    Seam("atexit", "_run_exitfuncs", "runs the atexit handlers now", _WARM, "present", ""),
    Seam(
        "multiprocessing.process",
        "_children",
        "the set of processes multiprocessing joins at exit; a run is taken out so it outlives its worker",
        _WARM,
        "present",
        "",
    ),
    # --- the shared TLS context: the clients' constructors it wraps ------------------------------------------
    Seam(
        "prefect.client.orchestration",
        "PrefectClient.__init__",
        "__init__(api, *, httpx_settings=...) builds its TLS context from httpx_settings['verify'] or the "
        "settings; wrapped to pass one shared context",
        _TLS,
        "source",
        "2619331e20adc1eb6846e8c96c12c46c0a03de1968eacb0c64e8e7a071cc18ec",
    ),
    Seam(
        "prefect.client.orchestration",
        "SyncPrefectClient.__init__",
        "as PrefectClient.__init__",
        _TLS,
        "source",
        "c5b9a41b666e497be22f97f2ece07d2ad370b1b047c373d21501a5eb91ee8c4e",
    ),
    # --- the fork server's preload: botocore's per-session loader -------------------------------------------
    Seam(
        "botocore.session",
        "Session._register_data_loader",
        "registers the session's data_loader component lazily from its data_path; replaced to share one loader",
        _PRELOAD,
        "source",
        "217146aba7ceda63ed06704a460145d69b977352c145f3ac7b2062c2e5be0180",
    ),
    Seam(
        "botocore.session",
        "ComponentLocator.lazy_register_component",
        "lazy_register_component(name, factory), on the private session._components",
        _PRELOAD,
        "source",
        "8d9a6246dc37ec523e214773e58a1371963cfa2ea21472657c4424d6caf8770f",
    ),
    # --- a forked run's settings -------------------------------------------------------------------------------
    Seam(
        "prefect.settings.base",
        "PrefectBaseSettings.settings_customise_sources",
        "what Settings() reads: PREFECT_ environment variables, .env, prefect.toml, pyproject.toml's "
        "[tool.prefect] and the profiles file; a run reuses the fork server's settings when all are the same",
        _SETTINGS,
        "source",
        "18bc906535d2ad7339929b1cb706bbe52ea8aeb0db77023162a21412858ed4ca",
    ),
    Seam(
        "prefect.settings.sources",
        "_get_profiles_path",
        "the profiles file the profile source reads, decided by PREFECT_ variables, .env, prefect.toml, "
        "pyproject.toml and HOME",
        _SETTINGS,
        "source",
        "94811318c40dce0abc22d3b0a72f73443229e7bfd923f8eed0b1bc3ca474ddde",
    ),
    Seam(
        "prefect.settings.sources",
        "_is_test_mode",
        "test mode comes from PREFECT_ variables only",
        _SETTINGS,
        "source",
        "078dbee25b540034c89e34d769907c9462ba1300399d8dd9bef4b83fc4366589",
    ),
    Seam(
        "prefect.settings.sources",
        "ProfileSettingsTomlLoader",
        "the active profile: PREFECT_PROFILE, the profiles file, `prefect --profile` (argv[0] ending "
        "/prefect; not a run)",
        _SETTINGS,
        "source",
        "7b7bffd8769d1627f7d4ea2d4566527f997d35cc065479aeec23c37262fe16dd",
    ),
    Seam(
        "prefect.settings.sources",
        "EnvFilterSettingsSource",
        "environment variables with the PREFECT_ prefix or a PREFECT_ alias",
        _SETTINGS,
        "source",
        "95b6a8e088ec3eab65ab1129c0891e8fc5376f331ff91082ae04cb27368747b7",
    ),
    Seam(
        "prefect.settings.sources",
        "FilteredDotEnvSettingsSource",
        ".env in the working directory",
        _SETTINGS,
        "source",
        "d435d0c6f11313ca96c9f363ce2e6a5fa296859b6705f54a2115f6de5ccb8adb",
    ),
    Seam(
        "prefect.settings.sources",
        "TomlConfigSettingsSourceBase",
        "a TOML file relative to the working directory",
        _SETTINGS,
        "source",
        "5933a7a0780314350d9e4bf3d9c799435f6cb4d887b46dfa553fa4ab5436fdd8",
    ),
    Seam(
        "prefect.settings.sources",
        "PrefectTomlConfigSettingsSource",
        "prefect.toml in the working directory",
        _SETTINGS,
        "source",
        "0e048f0be720ec89bc86745d5681b7d1e4c0e133c7c65db0bef93810208d4345",
    ),
    Seam(
        "prefect.settings.sources",
        "PyprojectTomlConfigSettingsSource",
        "pyproject.toml's [tool.prefect] in the working directory",
        _SETTINGS,
        "source",
        "a7ea3fde59462b1f0b70446e24edc7d4dc6287222aa1ffae41867ad46a0ea88c",
    ),
    Seam(
        "prefect.settings.base",
        "build_settings_config",
        "env_file .env, the PREFECT_ prefix, the TOML files' names, no secrets directory",
        _SETTINGS,
        "source",
        "9a07dce09edb7515e4ee0292454deb74bdb6b411c65922746440efa0ef61712e",
    ),
    # --- a pull step's event ---------------------------------------------------------------------------------
    Seam(
        "prefect.deployments.steps.core",
        "_emit_pull_step_event",
        "the event it sends (type, flow-run resource, deployment related, the step as payload), sent the same "
        "way through the run's events worker instead",
        _PULL_STEP,
        "source",
        "c05d13fcfa75f601aaa03faed08299d80002125fb45eff47c5d8fa2aa6aa2ca5",
    ),
    Seam(
        "prefect.deployments.steps.core",
        "run_steps",
        "calls _emit_pull_step_event by its module-global name (replaced there) with (step, event_type=, "
        "deployment=, flow_run=, logger=)",
        _PULL_STEP,
        "source",
        "55ba6613ffde17ce0506c85397c5e4665106433a32341b2b864846c099957b59",
    ),
    # --- a run's heartbeat thread -------------------------------------------------------------------------------
    Seam(
        "prefect.flow_engine",
        "_send_heartbeats",
        "a context manager (engine, join_on_exit=True) whose daemon thread sends nothing more once its stop event "
        "is set and returns at its next wake; join_on_exit=False (as its async engine passes) skips only the join",
        _HEARTBEAT,
        "source",
        "83e152cb73a04e977ca181188e99b3d583c894892b5456043b2eb51e45dbe996",
    ),
    Seam(
        "prefect.flow_engine",
        "FlowRunEngine.run_context",
        "enters _send_heartbeats(self) by its module-global name (replaced there) around the flow's call; a "
        "flow that returns has its final state before that context exits",
        _HEARTBEAT,
        "source",
        "b54488578c32160a45182b75ce9e645366a78132f1802518a2fe03dfa48e06de",
    ),
)


class SeamLookupError(Exception):
    """The seam's module or attribute is gone."""


def current_fingerprint(seam: Seam) -> str:
    """The seam's fingerprint in the installed packages; ``SeamLookupError`` if it is not there."""
    try:
        target: object = importlib.import_module(seam.module)
    except ImportError as exc:
        raise SeamLookupError(f"module {seam.module} does not import ({exc})") from exc
    for part in filter(None, seam.attribute.split(".")):
        try:
            target = inspect.getattr_static(target, part)
        except AttributeError as exc:
            raise SeamLookupError(f"{seam.name} does not exist") from exc
        # getattr_static keeps staticmethod/classmethod wrappers; the function inside is what is read.
        target = getattr(target, "__func__", target)
    if seam.kind == "present":
        return ""
    # Prefect's own code, also where a patch has wrapped it (shared_tls keeps it as __wrapped__).
    target = inspect.unwrap(target) if callable(target) else target
    try:
        text = inspect.getsource(target) if seam.kind == "source" else str(inspect.signature(target))  # type: ignore[arg-type]
    except (OSError, TypeError, ValueError) as exc:
        raise SeamLookupError(f"the {seam.kind} of {seam.name} cannot be read ({exc})") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def verify() -> list[str]:
    """Every difference between the seams as recorded and as installed, one sentence each; empty if none."""
    problems: list[str] = []
    installed = metadata.version("prefect")
    if installed != CHECKED_AGAINST_PREFECT:
        problems.append(
            f"Prefect is {installed}, but its private seams were checked against Prefect {CHECKED_AGAINST_PREFECT}: "
            "re-check every patch in prefect_patches/ (or run on Prefect's stock worker, `prefect worker start "
            "--type process`), then record the new values (python -m prefect_patches.seams --record)."
        )
    for seam in SEAMS:
        try:
            now = current_fingerprint(seam)
        except SeamLookupError as exc:
            problems.append(
                f"{seam.name} is gone since Prefect {CHECKED_AGAINST_PREFECT}: {exc}. We rely on: {seam.relied_on}. "
                f"Re-check {seam.user}, or run on Prefect's stock worker."
            )
            continue
        if now != seam.fingerprint:
            problems.append(
                f"{seam.name} changed since Prefect {CHECKED_AGAINST_PREFECT} (its {seam.kind} fingerprint is "
                f"{now or 'none'}, recorded {seam.fingerprint or 'none'}). We rely on: {seam.relied_on}. "
                f"Re-check {seam.user}, or run on Prefect's stock worker."
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_patches.seams", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--record", action="store_true", help="print each seam's current fingerprint, to paste into SEAMS"
    )
    args = parser.parse_args(argv)
    if args.record:
        sys.stdout.write(f"Prefect {metadata.version('prefect')}\n")
        for seam in SEAMS:
            try:
                sys.stdout.write(f"{seam.name}: {current_fingerprint(seam)!r}\n")
            except SeamLookupError as exc:
                sys.stdout.write(f"{seam.name}: {exc}\n")
        return 0
    problems = verify()
    for problem in problems:
        sys.stderr.write(problem + "\n")
    if not problems:
        sys.stdout.write(f"all {len(SEAMS)} seams as recorded for Prefect {CHECKED_AGAINST_PREFECT}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
