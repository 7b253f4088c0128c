"""tierkit.inventory: probe the kit and describe it as a Profile."""
__version__ = "0.1.0"
