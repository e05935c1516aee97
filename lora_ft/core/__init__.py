"""The bottom layer: errors, files, progress, the settings (`config`), the task registry's facts, the manifest,
recipes, statistics, tables and plots. No torch at import; imports nothing above it."""
