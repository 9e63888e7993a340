"""qcore-xnnpack: int8 annotation for ExecuTorch's XNNPACK delegate, as a qcore plugin."""
