"""rayserver: run Radiance simulations on a render host for rayfront clients."""

__version__ = "0.1.0"
