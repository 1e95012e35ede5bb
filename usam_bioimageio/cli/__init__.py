"""The `usam` command."""
