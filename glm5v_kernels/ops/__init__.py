"""Kernel families, one folder each: reference.py (the specification), triton.py (kernels and
launchers), op.py (what runs on which backend), __init__.py (the validated functional API); tiles.py holds
the Triton tile helpers more than one family uses."""
