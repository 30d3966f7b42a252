"""Operator notifications: the message model (``message.py``) and its Slack rendering and delivery
(``slack.py``)."""
