"""Reporting to GitHub: each deploy as a deployment of its commit, each build as a commit status.

``deployments.py`` maps the deploy's lifecycle to GitHub's requests (pure, tested as tables) and holds the one
client that sends them; every githubkit or httpx failure leaves it as a ``StatusReportError``.
"""
