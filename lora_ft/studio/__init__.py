"""`studio`: the workspace, the queue of runs (each lora_ft's own command in a process of its own) and its HTTP side."""
