"""What a process forked from the warm worker's fork server finds once it has become a run's
(``prefect_patches.warm_worker.enter_run``); the fork server imports this module by name (tests/test_worker.py)."""

from __future__ import annotations

from multiprocessing.connection import Connection


def report_run_start(environment: dict[str, str], cwd: str, sender: Connection) -> None:
    import prefect.deployments.steps.core as steps

    from prefect_patches import pull_step_events, settings_reuse
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
        }
    )
    sender.close()
