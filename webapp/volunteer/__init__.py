"""The volunteer page (``/``): websocket, worker pool, supervisor decisions, DOM. ``main.start()`` runs it."""
