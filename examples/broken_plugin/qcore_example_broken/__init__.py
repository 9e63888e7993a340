"""qcore-example-broken: a plugin that fails to load, on purpose (see ``plugin.py``)."""
