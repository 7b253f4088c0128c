"""The milestone catalog, planner, runner, CLI, and one package per tier."""
