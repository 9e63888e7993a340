"""qcore's product layer, on top of the framework: ``qcore.quantize`` (one call from a float
model to a quantized, lowered one), save/load, the report, the demo and the ``qcore`` command.

Nothing here names a backend: what a command needs to know about one (which to pick, what its
kernels are called, whether its lowered program runs in this process) comes from its
``qcore.Backend`` record. The framework (``qcore.pipeline``, the passes, the plugin manager)
never imports this package.
"""
