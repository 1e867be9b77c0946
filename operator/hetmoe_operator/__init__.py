"""hetmoe operator: plans and runs mixture-of-experts training on mixed accelerator grades.

The pure core (``api``, ``plan``, ``placement``, ``desired``, ``reconcile``) imports no
kopf, kubernetes client or torch; import-linter enforces it (see pyproject.toml).
"""

__version__ = "0.1.0"
