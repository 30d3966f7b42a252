"""Operator commands (``icd-registry``, ``icd-lock``): an entry layer beside ``flows/``.

Like the flows, a command may load blocks (``--block NAME``) and call the library; nothing imports it.
"""
