"""Public ops, one module per op (family): validation, backend choice,
autograd and fake (meta) kernels."""
