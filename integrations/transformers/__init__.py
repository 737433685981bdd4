"""igq_plugin.integrations.transformers: adapter package (planned, DESIGN.md §5 phase 2; nothing is exported yet)."""
