"""Our own compute kernels, for the cases the field's libraries leave slow (each file says why)."""
