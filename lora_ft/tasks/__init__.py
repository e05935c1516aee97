"""One module per task behind one protocol (`task_api`), reached only through `task_code` (the registry's code);
`evaluation` re-scores any task's adapter. Imports engine, data and core."""
