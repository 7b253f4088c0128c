"""Reference kits: data only; loaded by inventory.profile."""
