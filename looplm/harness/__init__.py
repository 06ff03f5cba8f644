"""lm-evaluation-harness support: the "looplm" model, the card's local tasks, the depth / exit-policy sweep.

Needs the `eval` extra (`pip install -e .[eval]`, which installs lm-eval); nothing else in looplm
imports this package. Importing looplm.harness.model registers the model with lm-eval.
"""
