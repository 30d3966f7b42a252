"""What the warm worker's fork server imports once, so that each flow run starts with it already loaded.

Imported only by the fork server (``multiprocessing``'s ``forkserver``, which takes nothing but module names
to preload), so the work happens at import time:

* the modules the worker names (Prefect's engine, each deployment's flow module and all they import);
* the pydantic models those modules define, completed now instead of at their first use in every run;
* python-hcl2's Lark parser, which the pre-flight check would otherwise build in every build run;
* botocore's service models, parsed once and shared by every boto3 session a run creates (below);
* one TLS context for the run's Prefect clients of an ``http://`` API (``prefect_patches/shared_tls.py``);
* Prefect's settings, which a run takes when it would read them from the same inputs
  (``prefect_patches/settings_reuse.py``);
* a pull step's event sent through the run's events worker (``prefect_patches/pull_step_events.py``);
* a run's end that does not wait for its heartbeat thread (``prefect_patches/heartbeat_stop.py``);
* last, all of it moved out of the garbage collector's sight (``gc.freeze()``, below).

A module that fails to import is left out rather than taking the fork server down: a run that needs it
imports it again in its own process and fails there, with the real error in the run's log, as a cold start
would.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import time
from collections.abc import Callable

from prefect_patches import PRELOAD_ENV, PROJECT_ENV, heartbeat_stop, pull_step_events, settings_reuse
from prefect_patches.shared_tls import reuse_tls_context_for_plain_http, shared_tls_context

# Project files changed after this moment are imported again by the run that finds them changed.
IMPORTED_AT = time.time()

FAILED: dict[str, str] = {}


def _import_named_modules() -> None:
    project = os.environ.get(PROJECT_ENV)
    if project and project not in sys.path:
        # Resolve the project's packages from the directory the flows run in, as the engine would after the
        # deployment's pull step (set_working_directory), not from wherever else they are installed.
        sys.path.insert(0, project)
    for name in filter(None, os.environ.get(PRELOAD_ENV, "").split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import error: leave it to the run that needs the module
            FAILED[name] = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(KeyError):
                del sys.modules[name]


def _complete_pydantic_models() -> None:
    """A model with forward references is built at its first validation (``model_rebuild``): Prefect's
    client schemas alone are ~300 such models, and reading a deployment cost a run 0.2 s of schema
    building before. Build them once here, with pydantic's public ``model_rebuild``."""
    from pydantic import BaseModel

    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model is not BaseModel and not model.__pydantic_complete__:
            with contextlib.suppress(Exception):  # one that cannot be built yet is built at its first use
                model.model_rebuild()


def _build_hcl_parser() -> None:
    """Lark builds python-hcl2's parser on first use (0.1-0.3 s); ``parser()`` keeps it for the process."""
    with contextlib.suppress(Exception):
        import hcl2.parser

        hcl2.parser.parser()


def _share_botocore_models() -> None:
    """botocore parses its JSON service models (S3's alone is megabytes) once per *session*, and
    prefect_aws opens a session per credentials block: a run paid 0.1-0.3 s per session to parse the same
    files. Sessions with the default data path share one loader instead, filled here for the services the
    flows use. It is botocore's own per-session cache, made per-process; nothing else about a session is
    shared."""
    try:
        import botocore
        import botocore.config
        import botocore.loaders
        import botocore.session
    except ImportError:
        return
    shared = botocore.loaders.create_loader()

    def register_data_loader(session: botocore.session.Session) -> None:
        def data_loader() -> botocore.loaders.Loader:
            data_path = session.get_config_variable("data_path")
            return shared if data_path is None else botocore.loaders.create_loader(data_path)

        session._components.lazy_register_component("data_loader", data_loader)  # type: ignore[attr-defined]

    botocore.session.Session._register_data_loader = register_data_loader  # type: ignore[attr-defined]
    session = botocore.session.get_session()
    unsigned = botocore.config.Config(signature_version=botocore.UNSIGNED)  # no credential look-up here
    for service in ("s3", "dynamodb", "sts"):
        session.create_client(service, region_name="us-east-1", config=unsigned)


def _optional(name: str, step: Callable[[], object]) -> None:
    """Run a preparation that runs can do without: one that fails is reported with the modules that could not be
    preloaded (``FAILED``), and every run then does what Prefect (or botocore) does by itself."""
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - whatever failed, runs work without it, as cold ones do
        FAILED[name] = f"{type(exc).__name__}: {exc}"


# Its own session: a signal to the worker's process group (a service manager stopping it) must not kill the
# fork server first, which would make every running child look as if it had exited. It still ends once the
# worker and every run it forked have ended (each holds its pipe). (Already a group leader, as a shell's job
# is: stays.)
with contextlib.suppress(OSError):
    os.setsid()
_import_named_modules()
_complete_pydantic_models()
_build_hcl_parser()
reuse_tls_context_for_plain_http()
shared_tls_context()  # built here, inherited by every fork: a run builds none of its own


_optional("settings reuse", settings_reuse.remember)  # settings this process can't read: each run reads its own
_optional("pull-step events", pull_step_events.install)  # Prefect's module moved: runs send it as Prefect does
_optional("heartbeat stop", heartbeat_stop.install)  # Prefect's engine moved: runs wait for the thread, as Prefect's
_optional("botocore models", _share_botocore_models)  # botocore's internals moved: runs parse the models themselves

# Last, once everything above is loaded: it stays for the fork server's life and every run inherits it. Frozen, it
# is out of the collector's sight: a run's full collections (each walked all ~200,000 inherited objects, 0.1-0.2 s)
# skip it, and the pages it lies on stay shared with the fork server instead of being copied as the collector
# touches them. Python's gc docs advise ``gc.freeze()`` before ``fork()`` for this.
gc.freeze()
