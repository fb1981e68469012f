"""UVM Compute's Python client: run a function over many inputs in volunteers' browsers.

from uvm_compute import Client
client = Client("http://127.0.0.1:8080", token)
job = client.map(fn, inputs)
job.results()
"""

from uvm_compute.client import (
    ApiError,
    Client,
    Job,
    JobCancelled,
    NoVolunteersWarning,
    TaskError,
    UnsendableFunction,
    UVMError,
    function_source,
)

__all__ = [
    "ApiError",
    "Client",
    "Job",
    "JobCancelled",
    "NoVolunteersWarning",
    "TaskError",
    "UVMError",
    "UnsendableFunction",
    "function_source",
]
