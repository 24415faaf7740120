"""An emulator of the Messages API for tests, benchmarks and demos.

`MessagesServer` serves the API and its token endpoint on two loopback origins, with a seeded
dataset and injectable faults; `OriginRecorder` stands in for any other origin, to prove that
nothing leaks there; `FileHost` serves attachment files on another origin. None imports the
client: they implement PROTOCOL.md independently.
"""

from ._faults import Fault, FaultHandle
from ._files import FileHost, HostedFile
from ._recorder import OriginRecorder, RequestRecord
from ._serve import run_forever, serve, serve_main
from ._server import MessagesServer

__all__ = [
    "Fault",
    "FaultHandle",
    "FileHost",
    "HostedFile",
    "MessagesServer",
    "OriginRecorder",
    "RequestRecord",
    "run_forever",
    "serve",
    "serve_main",
]
