"""qcore-onednn-x86: x86 int8 annotation and lowering to oneDNN kernels, as a qcore plugin."""
