"""A qcore plugin module that raises on import, as a plugin with a missing dependency would.

qcore skips it with a warning naming the plugin (``example_broken``), its distribution
(``qcore-example-broken``) and this error; ``qcore plugins`` lists it as failed; with
``QCORE_STRICT_PLUGINS=1`` loading plugins raises ``qcore.errors.PluginError`` instead.
"""

raise RuntimeError("qcore-example-broken fails to import on purpose (it shows how qcore handles a broken plugin)")
