"""Analyses of a recipe's model: layer sensitivity ("Oh! We Freeze") and CVXQ bit allocation."""
