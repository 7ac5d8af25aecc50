"""omeflow cluster side: the gateway, schedulers, steps and image stores."""

__version__ = "0.1.0"
