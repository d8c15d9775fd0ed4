"""Named experiments: `python run.py exp=<module name>`; see research/registry.py for the format."""
