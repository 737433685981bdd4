"""igq_plugin.integrations.torch_ao: adapter package (planned, DESIGN.md §5 phase 2; nothing is exported yet)."""
