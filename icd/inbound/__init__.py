"""Requests that come in from outside (a GitHub push today; Slack approvals later): verified, parsed and
decided here, as pure functions; ``cli/inbound.py`` serves them over HTTP."""
