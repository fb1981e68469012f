"""The researchers' dashboard (``/dashboard``): API calls, inputs, views, Try. ``main.start()`` runs it."""
