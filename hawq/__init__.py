"""hawq: Hessian-trace sensitivity and mixed-precision bit allocation (not implemented yet; issue #6)."""
