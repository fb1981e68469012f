"""The volunteer supervisor and the Pyodide worker side."""
