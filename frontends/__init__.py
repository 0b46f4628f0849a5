"""Framework frontends (torch, tensorflow, jax) live here; imported as spa.frontends."""
