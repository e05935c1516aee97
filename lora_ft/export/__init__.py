"""`merge`: an adapter folded into its base, checked, exported (also as GGUF). Reaches the task through the registry."""
