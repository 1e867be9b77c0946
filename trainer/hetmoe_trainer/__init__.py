"""hetmoe trainer: the Ling-architecture MoE trainer that follows a hetmoe plan.

Started in every worker by torchrun: ``python -m hetmoe_trainer --plan plan.json``.
"""
