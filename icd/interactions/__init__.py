"""Operators acting from Slack: approval buttons, the reject modal, alert acknowledgements and silences.

Slack delivers each interaction (a button click, a modal submitted) either to the HTTP endpoint of
``icd-inbound`` (signed: ``icd/interactions/signing.py``) or over Socket Mode; both hand the payload to one
:class:`~icd.interactions.reply.InteractionHandler`, which answers at once and acts after answering.
"""
