"""The `mountctl` command line."""
