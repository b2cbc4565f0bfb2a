"""Report rendering: figures, HTML/PDF, JSON and JUnit outputs."""
