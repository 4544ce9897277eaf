"""Analyses of a recipe's model: layer sensitivity ("Oh! We Freeze") and CVXQ bit allocation.

This file stays free of heavy imports: the command line reads ``RANK_KEYS`` to build its parser."""


RANK_KEYS = {  # --rank-by -> the per-type field ranked (descending)
    "grad_ratio_all": "grad_ratio_all_mean",
    "grad_ratio_only": "grad_ratio_only_mean",
    "grad_error_only": "grad_error_only_mean",
    "delta_nll": "delta_nll",
    "delta_nll_per_mparam": "delta_nll_per_mparam",
    "output_error": "output_error_mean",
}
