"""Message templates and their sandboxed rendering (see docs/templates.md)."""
