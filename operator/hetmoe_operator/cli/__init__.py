"""The ``hetmoe`` command line: one module per sub-command, named ``*_command``."""
