"""What every task's run is built from: models and their precision, PEFT methods, the Trainer's arguments, callbacks
and fit, the run folder, adapters saved and loaded, batched generation. Imports core and data only."""
