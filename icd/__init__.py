"""immutable-cd's library: everything the flows do that does not need a Prefect task or flow.

Sub-packages by concept (the README's layout table names the file of each):

* ``icd.tools``    the Packer and Terraform adapters and the one subprocess chokepoint;
* ``icd.registry`` the artifact registry and the saved-plan store on S3;
* ``icd.deploy``   git sources, artifacts, Terraform working directories, plan summaries, approval rules,
                   the workspace lock, deploy records;
* ``icd.health``   the Consul health engine, its state, the watch loop and the post-apply gate;
* ``icd.notify``   the notification model and its Slack rendering and delivery.

``icd.errors`` is the one exception tree, ``icd.rules`` the one rule set for names and bounds, and
``icd.text`` escapes what operators type for each place it is shown. Nothing here imports ``blocks``,
``tasks`` or ``flows`` (checked by import-linter, see ``pyproject.toml``).
"""
