"""The `seesay` command line."""
