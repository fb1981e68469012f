"""Python that runs in the browser (PyScript): the volunteer page and the dashboard."""
