"""Consul health: snapshot parsing, the pure transition engine, its persisted state, alert rendering, the
watch loop, deploy windows and the post-apply gate. Everything talks to Consul through py-consul, with its
errors translated in one place (``consul.py``)."""
