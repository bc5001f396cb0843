"""Public ops, one module per op (family): validation, backend choice, and every
fake (meta) kernel and autograd registration of the op's compiled and Triton
ops (docs/design.md §2.2). The leaf modules ``_vocab`` (names, codes and
constants), ``_registry`` (registration helpers) and ``_checks`` (argument
checks) import nothing that leads back here."""
