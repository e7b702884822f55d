"""Ground-floor helpers any module may use (they import nothing else of flowforge)."""
