"""What a process forked from the warm worker's fork server finds once it has become a run's
(``prefect_patches.warm_worker.enter_run``); the fork server imports this module by name (tests/test_worker.py)."""

from __future__ import annotations

from multiprocessing.connection import Connection


def report_run_start(environment: dict[str, str], cwd: str, sender: Connection) -> None:
    import gc

    import prefect.deployments.steps.core as steps
    import prefect.flow_engine

    from prefect_patches import heartbeat_stop, pull_step_events, settings_reuse
    from prefect_patches.warm_worker import enter_run

    settings = enter_run(environment, cwd)
    remembered = settings_reuse._REMEMBERED
    sender.send(
        {
            "settings": "the fork server's" if remembered is not None and settings is remembered[1] else "its own",
            "pull-step event": (
                "through the run's events worker"
                if steps._emit_pull_step_event is pull_step_events.emit_pull_step_event
                else "Prefect's own client"
            ),
            "heartbeat thread": (
                "not waited for"
                if getattr(prefect.flow_engine._send_heartbeats, heartbeat_stop._PATCHED, False)
                else "joined as Prefect does"
            ),
            # What the fork server had loaded is frozen (prefect_patches/fork_server_preload.py): far more objects
            # than a run creates before this point, and none of them in a generation its collections walk.
            # The worker checked the server's version; its runs don't ask again (cli/worker.py).
            "server version check": ("on" if settings.client.server_version_check_enabled else "left to the worker"),
            "inherited heap": "frozen" if gc.get_freeze_count() > 100_000 else f"{gc.get_freeze_count()} frozen",
        }
    )
    sender.close()
