"""Measuring: training speed and memory (`speed`), inference (`inference`), serving (`serving`), the course's code as a
peer (`course`), and `compare` (methods, ranks and seeds)."""
